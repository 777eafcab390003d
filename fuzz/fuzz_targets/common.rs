//! Shared by the fuzz targets: one fixed, valid configuration to take settings from.

use std::path::Path;

use tether::config::{Config, EnvOverrides};

/// Every key source, an insert cookie with two secrets, the default limits.
const CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[affinity]
sources = ["insert", "cookie:connect.sid", "header:x-session", "query:sid", "ip"]

[affinity.insert]
cookie = "tether"
secrets = ["fuzzing-secret-number-one", "fuzzing-secret-number-two"]

[[backend]]
id = "a"
address = "127.0.0.1:3001"

[[backend]]
id = "b"
address = "127.0.0.1:3002"
"#;

pub fn config() -> Config {
    Config::parse(Path::new("fuzz.toml"), CONFIG, &EnvOverrides::default())
        .expect("the fuzz targets' config is valid")
}
