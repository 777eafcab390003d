//! Configuration files (`tether check`, reload): TOML, then tether's validation. No panic;
//! every diagnostic points inside the file; parsing is deterministic. Names are not resolved
//! (`cfg(fuzzing)` in src/config.rs): every address must be an IP literal here.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether::config::{Config, EnvOverrides};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Relative file names (`ca_file`) resolve against a directory that does not exist.
    let path = Path::new("/nonexistent-tether-fuzz/fuzz.toml");
    let env = EnvOverrides::default();
    let first = Config::parse(path, text, &env);
    let again = Config::parse(path, text, &env);
    match (first, again) {
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string());
            assert!(!a.diagnostics.is_empty(), "an error without a diagnostic");
            let lines = text.split('\n').count();
            for d in &a.diagnostics {
                if let Some((line, col)) = d.position {
                    assert!(line >= 1 && line <= lines, "line {line} of {lines}: {}", d.message);
                    assert!(col >= 1, "column {col}");
                }
            }
        }
        _ => panic!("Config::parse is not deterministic"),
    }
});
