//! rideshare: the demo app behind tether (grows in the rideshare issue).
