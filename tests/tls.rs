//! TLS listeners: certificates made here (rcgen, a CA of the test's own), real clients (reqwest
//! over rustls with HTTP/1.1 and HTTP/2, curl, a bare rustls handshake to see which certificate
//! tether presents), `tether check` on bad files, and certificates swapped by a reload.

mod support;

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use support::scenario::*;
use support::*;

const WAIT: Duration = Duration::from_secs(10);

/// A test CA and the files it signs, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        Pki::named("tether tls test CA")
    }

    /// A CA of its own name (two CAs of one name would only differ by their keys).
    fn named(name: &str) -> Pki {
        let (ca_pem, issuer) = test_ca(name);
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca_pem,
            issuer,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Sign a certificate for `names` valid from `from` to `until` days from now, written as
    /// `<file>.pem` (leaf, then the CA: a chain in order) and `<file>.key`; returns the leaf DER.
    fn issue(&self, file: &str, names: &[&str], from: i64, until: i64) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time_now();
        params.not_before = now + time_days(from);
        params.not_after = now + time_days(until);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(
            self.path(&format!("{file}.pem")),
            format!("{}{}", cert.pem(), self.ca_pem),
        )
        .unwrap();
        std::fs::write(self.path(&format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    /// The `[tls]` section naming `files` (each `<file>.pem` and `<file>.key`), in order.
    fn tls_section(&self, files: &[&str]) -> String {
        let certs: Vec<String> = files
            .iter()
            .map(|f| {
                format!(
                    "{{ cert = \"{}\", key = \"{}\" }}",
                    self.path(&format!("{f}.pem")).display(),
                    self.path(&format!("{f}.key")).display()
                )
            })
            .collect();
        format!("[tls]\ncerts = [{}]\n\n", certs.join(", "))
    }

    /// A server config presenting `<file>.pem` and `<file>.key` (a test backend's HTTPS).
    fn server_config(&self, file: &str) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(self.path(&format!("{file}.pem")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(self.path(&format!("{file}.key"))).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Arc::new(config)
    }

    fn ca_file(&self) -> PathBuf {
        let path = self.path("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn time_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

/// The body of a config with `backends`, keyed by the session header, round robin.
fn body(tls: &str, backends: &[&Backend]) -> String {
    body_keyed(tls, &format!("header:{SESSION_HEADER}"), backends)
}

/// [`body`] keyed by `source`.
fn body_keyed(tls: &str, source: &str, backends: &[&Backend]) -> String {
    let mut out = format!(
        "{tls}[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\nsources = [\"{source}\"]\npolicy = \"round_robin\"\n\n"
    );
    for b in backends {
        out.push_str(&b.toml());
        out.push('\n');
    }
    out
}

/// A tether with one TLS listener (and the harness's plain one); returns it and the TLS port.
async fn tls_balancer(tls: &str, backends: &[&Backend]) -> (Balancer, u16) {
    tls_balancer_with(BalancerOptions::default(), &body(tls, backends)).await
}

/// [`tls_balancer`] with `options` (their `server_extra` follows `listen_tls`) and a config body
/// of the test's own.
async fn tls_balancer_with(mut options: BalancerOptions, config_body: &str) -> (Balancer, u16) {
    let port = free_port();
    options.server_extra = format!(
        "listen_tls = [\"127.0.0.1:{port}\"]\n{}",
        options.server_extra
    );
    (Balancer::start_with(options, config_body).await, port)
}

/// A reqwest client trusting only the test CA, resolving `host` to the TLS listener.
fn https_client(pki: &Pki, host: &str, port: u16, http1_only: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .resolve(host, ([127, 0, 0, 1], port).into())
        .timeout(WAIT);
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// The leaf certificate tether presents to a handshake naming `sni` (`None`: no SNI), and the
/// protocol ALPN chose. Any certificate is accepted here: the point is which one comes.
fn presented(port: u16, sni: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
    #[derive(Debug)]
    struct Record(Mutex<Option<Vec<u8>>>);
    impl rustls::client::danger::ServerCertVerifier for Record {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            *self.0.lock().unwrap() = Some(end_entity.to_vec());
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let record = Arc::new(Record(Mutex::new(None)));
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(record.clone())
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.enable_sni = sni.is_some();
    // With SNI off rustls still needs a name to verify against; an IP literal sends none.
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::try_from("127.0.0.1").unwrap(),
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("TLS handshake");
    }
    let _ = sock.flush();
    let cert = record.0.lock().unwrap().clone().expect("a certificate");
    (cert, conn.alpn_protocol().map(<[u8]>::to_vec))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_reaches_one_backend_over_http2_and_http1_with_forwarded_proto_https() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backends = [
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let (lb, port) = tls_balancer(&pki.tls_section(&["site"]), &refs).await;
    let h2 = https_client(&pki, "site.test", port, false);
    let h1 = https_client(&pki, "site.test", port, true);
    let url = format!("https://site.test:{port}/where");
    for session in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"] {
        let mut seen = Vec::new();
        for (client, version) in [
            (&h2, reqwest::Version::HTTP_2),
            (&h1, reqwest::Version::HTTP_11),
            (&h2, reqwest::Version::HTTP_2),
            (&h1, reqwest::Version::HTTP_11),
        ] {
            let resp = client
                .get(&url)
                .header(SESSION_HEADER, session)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET over TLS: {e}\n{}", tail(&lb.log(), 30)));
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), version);
            let backend = resp
                .headers()
                .get("x-backend-id")
                .expect("x-backend-id")
                .to_str()
                .unwrap()
                .to_string();
            seen.push(backend);
        }
        assert!(
            seen.iter().all(|b| *b == seen[0]),
            "session {session} moved between backends: {seen:?}"
        );
    }
    // Round robin spread the six sessions; every one of them told its backend it came over TLS.
    for b in &backends {
        assert!(b.requests() > 0, "{} got nothing", b.id());
        for r in b.recorded() {
            assert_eq!(
                r.headers
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok()),
                Some("https"),
                "{} got {:?}",
                b.id(),
                r.headers
            );
        }
    }
    // The plain listener still says http.
    let plain = client()
        .get(lb.url("/plain"))
        .header(SESSION_HEADER, "alpha")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    let served = backends
        .iter()
        .find(|b| b.recorded().iter().any(|r| r.uri.path() == "/plain"))
        .expect("someone served /plain");
    let last = served.last_headers();
    assert_eq!(last.get("x-forwarded-proto").unwrap(), "http");
    // Six sessions, two requests each way; and the plain one.
    for (sample, least) in [
        ("protocol=\"h2\",scheme=\"https\"", 12.0),
        ("protocol=\"http/1.1\",scheme=\"https\"", 12.0),
        ("protocol=\"http/1.1\",scheme=\"http\"", 1.0),
    ] {
        let n = lb
            .metric(&format!("tether_requests_by_protocol_total{{{sample}}}"))
            .await
            .unwrap_or(0.0);
        assert!(n >= least, "{sample}: {n}");
    }
    let handshakes = lb
        .metric("tether_tls_handshakes_total{version=\"1.3\"}")
        .await
        .unwrap_or(0.0);
    assert!(
        handshakes >= 2.0,
        "TLS 1.3 handshakes counted: {handshakes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_key_the_session_and_reach_the_backend_as_one_field() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backends = [Backend::start("b1").await, Backend::start("b2").await];
    let refs: Vec<&Backend> = backends.iter().collect();
    let config = body_keyed(&pki.tls_section(&["site"]), "cookie:sid", &refs);
    let (lb, port) = tls_balancer_with(BalancerOptions::default(), &config).await;
    let h2 = https_client(&pki, "site.test", port, false);
    let h1 = https_client(&pki, "site.test", port, true);
    let url = format!("https://site.test:{port}/crumbs");
    for sid in ["one", "two", "three", "four"] {
        // The session cookie in the second crumb.
        let resp = h2
            .get(&url)
            .header("cookie", "theme=dark")
            .header("cookie", format!("sid={sid}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", tail(&lb.log(), 20)));
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let by_h2 = resp.headers()["x-backend-id"].to_str().unwrap().to_string();
        let resp = h1
            .get(&url)
            .header("cookie", format!("theme=dark; sid={sid}"))
            .send()
            .await
            .unwrap();
        let by_h1 = resp.headers()["x-backend-id"].to_str().unwrap().to_string();
        assert_eq!(by_h2, by_h1, "sid={sid}: the crumb did not key the session");
    }
    for b in &backends {
        for r in b.recorded() {
            let cookies: Vec<_> = r.headers.get_all("cookie").iter().collect();
            assert_eq!(cookies.len(), 1, "{}: {:?}", b.id(), r.headers);
            let v = cookies[0].to_str().unwrap();
            assert!(v.starts_with("theme=dark; sid="), "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http2_and_http1_over_tls_and_sticks() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backends = [Backend::start("b1").await, Backend::start("b2").await];
    let refs: Vec<&Backend> = backends.iter().collect();
    let (lb, port) = tls_balancer(&pki.tls_section(&["site"]), &refs).await;
    let ca = pki.ca_file();
    let curl = |version: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", version, "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("site.test:{port}:127.0.0.1"),
                "-H",
                &format!("{SESSION_HEADER}: kilo"),
                "-o",
                "/dev/null",
                "-D",
                "-",
                "-w",
                "version=%{http_version}\n",
                &format!("https://site.test:{port}/"),
            ])
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(
            out.status.success(),
            "curl {version}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&lb.log(), 20)
        );
        let backend = text
            .lines()
            .find_map(|l| l.strip_prefix("x-backend-id: "))
            .expect("x-backend-id")
            .trim()
            .to_string();
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix("version="))
            .unwrap()
            .to_string();
        (backend, v)
    };
    let (b2, v2) = curl("--http2");
    let (b1, v1) = curl("--http1.1");
    assert_eq!(v2, "2");
    assert_eq!(v1, "1.1");
    assert_eq!(b1, b2, "one session, two protocols, two backends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_anything_else_gets_the_first() {
    let pki = Pki::new();
    let first = pki.issue("first", &["first.test"], -1, 90);
    let wild = pki.issue("wild", &["*.wild.test"], -1, 90);
    let exact = pki.issue("exact", &["api.wild.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let (lb, port) = tls_balancer(&pki.tls_section(&["first", "wild", "exact"]), &[&backend]).await;
    for (sni, want, what) in [
        (Some("first.test"), &first, "exact name"),
        (Some("FIRST.test"), &first, "names are case-insensitive"),
        (Some("a.wild.test"), &wild, "wildcard"),
        (
            Some("api.wild.test"),
            &exact,
            "an exact name beats a wildcard",
        ),
        (
            Some("a.b.wild.test"),
            &first,
            "a wildcard covers one label only",
        ),
        (
            Some("nobody.test"),
            &first,
            "unknown name: the first certificate",
        ),
        (None, &first, "no SNI: the first certificate"),
    ] {
        let (got, alpn) = presented(port, sni);
        assert!(got == *want, "{what} ({sni:?}): another certificate came");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN offers h2 first");
    }
    assert!(
        lb.metric("tether_tls_certificate_expiry_timestamp_seconds{certificate=\"*.wild.test\"}")
            .await
            .is_some()
    );
}

/// `tether check` on a config whose `[tls]` is `tls`.
fn check(dir: &Path, tls: &str) -> (bool, String) {
    let path = dir.join("t.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten_tls = [\"127.0.0.1:8443\"]\n\n{tls}[affinity]\nsources = [\"ip\"]\n\n[[backend]]\nid = \"a\"\naddress = \"127.0.0.1:3001\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_refuses_bad_certificate_files_with_file_line_col() {
    let pki = Pki::new();
    pki.issue("good", &["good.test"], -1, 90);
    pki.issue("expired", &["old.test"], -30, -1);
    pki.issue("future", &["new.test"], 2, 90);
    pki.issue("soon", &["soon.test"], -1, 5);
    pki.issue("other", &["other.test"], -1, 90);
    let dir = pki.dir.path();
    // A key that is not the certificate's.
    std::fs::copy(pki.path("other.key"), pki.path("mismatch.key")).unwrap();
    std::fs::copy(pki.path("good.pem"), pki.path("mismatch.pem")).unwrap();
    // The CA before the leaf: out of order.
    let good = std::fs::read_to_string(pki.path("good.pem")).unwrap();
    let split = good.find(&pki.ca_pem).unwrap();
    std::fs::write(
        pki.path("reversed.pem"),
        format!("{}{}", pki.ca_pem, &good[..split]),
    )
    .unwrap();
    std::fs::copy(pki.path("good.key"), pki.path("reversed.key")).unwrap();
    std::fs::write(pki.path("junk.pem"), "not a certificate\n").unwrap();
    std::fs::copy(pki.path("good.key"), pki.path("junk.key")).unwrap();

    let (ok, out) = check(dir, &pki.tls_section(&["good"]));
    assert!(ok, "{out}");
    // [tls] is line 4, certs line 5: `certs = [{ cert = "` puts the cert path's quote at column
    // 19, the key's ten columns after the path's closing quote.
    let key_col = |f: &str| 29 + pki.path(&format!("{f}.pem")).display().to_string().len();
    for (file, in_key, needle) in [
        ("expired", false, "expired on"),
        ("future", false, "not valid before"),
        ("mismatch", true, "is not the key of the certificate"),
        ("reversed", false, "is not issued by certificate 2"),
        ("junk", false, "holds no PEM certificate"),
    ] {
        let (ok, out) = check(dir, &pki.tls_section(&[file]));
        assert!(!ok, "{file}: accepted\n{out}");
        let col = if in_key { key_col(file) } else { 19 };
        assert!(
            out.contains(&format!("t.toml:5:{col}: ")) && out.contains(needle),
            "{file}: want 5:{col} and `{needle}` in:\n{out}"
        );
    }
    let (ok, out) = check(dir, &pki.tls_section(&["soon"]));
    assert!(ok, "{out}");
    assert!(
        out.contains("t.toml:5:19: warning:")
            && (out.contains("in 4 days") || out.contains("in 5 days")),
        "{out}"
    );
    let (ok, out) = check(dir, "");
    assert!(
        !ok && out.contains("`[server] listen_tls` needs a [tls] section"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_certificates_and_a_bad_file_changes_nothing() {
    let pki = Pki::new();
    let before = pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let tls = pki.tls_section(&["site"]);
    let (mut lb, port) = tls_balancer(&tls, &[&backend]).await;
    assert!(presented(port, Some("site.test")).0 == before);
    // An open connection keeps its session while the files change under it.
    let h1 = https_client(&pki, "site.test", port, true);
    let url = format!("https://site.test:{port}/");
    assert_eq!(h1.get(&url).send().await.unwrap().status(), 200);

    let after = pki.issue("site", &["site.test"], -1, 90);
    lb.write_config(&body(&tls, &[&backend]));
    lb.sighup();
    assert!(
        eventually(WAIT, || async {
            presented(port, Some("site.test")).0 == after
        })
        .await,
        "new handshakes never got the new certificate\n{}",
        tail(&lb.log(), 20)
    );
    assert_eq!(h1.get(&url).send().await.unwrap().status(), 200);

    // A key that does not match: the reload is refused, the running certificate stays.
    pki.issue("other", &["site.test"], -1, 90);
    std::fs::copy(pki.path("other.key"), pki.path("site.key")).unwrap();
    let failed = lb
        .metric("tether_config_reloads_total{result=\"failed\"}")
        .await
        .unwrap_or(0.0);
    lb.sighup();
    assert!(
        eventually(WAIT, || async {
            lb.metric("tether_config_reloads_total{result=\"failed\"}")
                .await
                .unwrap_or(0.0)
                > failed
        })
        .await,
        "the bad reload was not counted\n{}",
        tail(&lb.log(), 20)
    );
    assert!(lb.log().contains("is not the key of the certificate"));
    assert!(presented(port, Some("site.test")).0 == after);
    assert_eq!(h1.get(&url).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_with_no_failed_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let tls = pki.tls_section(&["site"]);
    let (mut lb, port) = tls_balancer(&tls, &[&backend]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    // Four clients, HTTP/1.1 and HTTP/2, each request on a new connection (a new handshake),
    // and one keep-alive client whose connection lives through every rotation.
    let mut load = Vec::new();
    for (i, (http1, fresh)) in [(true, true), (false, true), (true, true), (false, false)]
        .into_iter()
        .enumerate()
    {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
        load.push(tokio::spawn(async move {
            let build = || {
                let mut b = reqwest::Client::builder()
                    .no_proxy()
                    .tls_built_in_root_certs(false)
                    .add_root_certificate(ca.clone())
                    .resolve("site.test", ([127, 0, 0, 1], port).into())
                    .timeout(WAIT);
                if http1 {
                    b = b.http1_only();
                }
                b.build().unwrap()
            };
            let mut client = build();
            let url = format!("https://site.test:{port}/");
            while !stop.load(Ordering::Relaxed) {
                if fresh {
                    client = build();
                }
                match client
                    .get(&url)
                    .header(SESSION_HEADER, format!("c{i}"))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("client {i}: {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("client {i}: {e}")),
                }
            }
        }));
    }
    for _ in 0..3 {
        let before = done.load(Ordering::Relaxed);
        assert_eventually!(WAIT, done.load(Ordering::Relaxed) >= before + 20);
        let want = pki.issue("site", &["site.test"], -1, 90);
        lb.write_config(&body(&tls, &[&backend]));
        lb.sighup();
        assert_eventually!(
            WAIT,
            presented(port, Some("site.test")).0 == want,
            "no rotation\n{}",
            tail(&lb.log(), 20)
        );
    }
    let before = done.load(Ordering::Relaxed);
    assert_eventually!(WAIT, done.load(Ordering::Relaxed) >= before + 20);
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:?}\n{}", tail(&lb.log(), 20));
    assert_eq!(
        lb.metric("tether_config_reloads_total{result=\"ok\"}")
            .await,
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_cookies_are_secure_over_tls_and_not_over_plain_http_unless_configured() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let set_cookie = |secure: &str| {
        format!(
            "{}\n[affinity.insert]\nsecrets = [\"tls-test-secret-0123456789\"]\n{secure}\n",
            body_keyed(&pki.tls_section(&["site"]), "insert", &[&backend])
        )
    };
    for (secure, plain_secure, tls_secure) in [
        ("", false, true),
        ("secure = true", true, true),
        ("secure = false", false, false),
    ] {
        let (lb, port) = tls_balancer_with(BalancerOptions::default(), &set_cookie(secure)).await;
        let cookie_of = |resp: &reqwest::Response| {
            resp.headers()
                .get("set-cookie")
                .expect("a minted key sets the cookie")
                .to_str()
                .unwrap()
                .to_string()
        };
        let plain = client().get(lb.url("/")).send().await.unwrap();
        let c = cookie_of(&plain);
        assert_eq!(
            c.contains("; Secure"),
            plain_secure,
            "{secure:?}, plain: {c}"
        );
        for http1_only in [true, false] {
            let resp = https_client(&pki, "site.test", port, http1_only)
                .get(format!("https://site.test:{port}/"))
                .send()
                .await
                .unwrap();
            let c = cookie_of(&resp);
            assert_eq!(
                c.contains("; Secure"),
                tls_secure,
                "{secure:?}, {:?}: {c}",
                resp.version()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_listener_sends_every_request_to_https_but_acme_challenges() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let redirect_port = free_port();
    let options = BalancerOptions {
        server_extra: format!("listen_redirect = [\"127.0.0.1:{redirect_port}\"]\n"),
        ..BalancerOptions::default()
    };
    let (lb, tls_port) =
        tls_balancer_with(options, &body(&pki.tls_section(&["site"]), &[&backend])).await;
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{redirect_port}");
    for (method, path) in [
        (reqwest::Method::GET, "/a/b?c=1"),
        (reqwest::Method::HEAD, "/"),
        (reqwest::Method::POST, "/form"),
    ] {
        let resp = no_redirects
            .request(method.clone(), format!("{base}{path}"))
            .header("host", "site.test")
            .body(if method == reqwest::Method::POST {
                "x=1"
            } else {
                ""
            })
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", tail(&lb.log(), 20)));
        assert_eq!(resp.status(), 308, "{method} {path}");
        assert_eq!(
            resp.headers()["location"],
            format!("https://site.test:{tls_port}{path}").as_str()
        );
    }
    assert_eq!(
        backend.requests(),
        0,
        "a redirected request reached the backend"
    );
    let challenge = no_redirects
        .get(format!("{base}/.well-known/acme-challenge/tok3n"))
        .header("host", "site.test")
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 200);
    assert_eq!(challenge.headers()["x-backend-id"], "b1");
    assert_eq!(backend.requests(), 1);
    // The plain listener is not a redirect listener.
    assert_eq!(
        client()
            .get(lb.url("/plain"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_hands_the_tls_listener_over() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let options = BalancerOptions {
        grace_period_secs: 1,
        graceful_shutdown_timeout_secs: 1,
        upgrade_sock: true,
        ..BalancerOptions::default()
    };
    let (mut lb, port) =
        tls_balancer_with(options, &body(&pki.tls_section(&["site"]), &[&backend])).await;
    let url = format!("https://site.test:{port}/");
    for http1_only in [true, false] {
        let c = https_client(&pki, "site.test", port, http1_only);
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    let upgrade = lb.graceful_upgrade().await;
    assert_ne!(upgrade.new_pid, upgrade.old_pid);
    // The old process is gone: whatever answers on the TLS port now is the new one.
    for http1_only in [true, false] {
        let c = https_client(&pki, "site.test", port, http1_only);
        let resp = c
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("after the upgrade: {e}\n{}", tail(&lb.log(), 30)));
        assert_eq!(resp.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_client_hello_and_a_silent_client_hurt_no_one_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let (mut lb, port) = tls_balancer(&pki.tls_section(&["site"]), &[&backend]).await;
    // A client that connects and never says anything stays open meanwhile.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0, 0, 0][..],
        &[0u8; 600][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(garbage).await.unwrap();
        let mut buf = [0u8; 1024];
        // tether closes (maybe after a TLS alert); it never answers in HTTP.
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(n) if buf[..n].starts_with(b"HTTP") => return false,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert_eq!(closed, Ok(true), "after {garbage:?}");
    }
    let c = https_client(&pki, "site.test", port, false);
    let resp = c
        .get(format!("https://site.test:{port}/"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&lb.log(), 20)));
    assert_eq!(resp.status(), 200);
    assert!(lb.is_running(), "tether died");
    // Each of the three was counted as no TLS at all.
    assert_eventually!(
        WAIT,
        lb.metric("tether_tls_handshake_failures_total{reason=\"not_tls\"}")
            .await
            == Some(3.0),
        "{}",
        tail(&lb.log(), 10)
    );
}

/// A rustls client to `port` offering `alpn`, trusting `roots`: the handshake's result.
fn handshake_with(
    port: u16,
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
) -> Result<(), rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("site.test").unwrap())
            .unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            // Send the alert rustls queued, as a real client does, before closing.
            let _ = conn.write_tls(&mut sock);
            return Err(e
                .into_inner()
                .and_then(|e| e.downcast::<rustls::Error>().ok())
                .map_or(rustls::Error::General("io".into()), |e| *e));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_by_reason() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let (lb, port) = tls_balancer(&pki.tls_section(&["site"]), &[&backend]).await;
    let ca_roots = || {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    };
    let failures = tokio::task::spawn_blocking({
        let roots = ca_roots();
        move || {
            // A client that does not trust the certificate refuses it with an alert.
            let distrust = handshake_with(port, rustls::RootCertStore::empty(), &[b"h2"]);
            // A client that speaks no protocol tether offers.
            let alpn = handshake_with(port, roots, &[b"spdy/3"]);
            // A ClientHello, then gone.
            let mut hello = Vec::new();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
            let mut conn = rustls::ClientConnection::new(
                Arc::new(config),
                ServerName::try_from("site.test").unwrap(),
            )
            .unwrap();
            conn.write_tls(&mut hello).unwrap();
            let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
            sock.write_all(&hello).unwrap();
            drop(sock);
            (distrust, alpn)
        }
    })
    .await
    .unwrap();
    assert!(failures.0.is_err() && failures.1.is_err(), "{failures:?}");
    // And one handshake that works.
    handshake_with(port, ca_roots(), &[b"h2"]).expect("a good handshake");
    for reason in ["client_alert", "incompatible", "closed"] {
        assert_eventually!(
            WAIT,
            lb.metric(&format!(
                "tether_tls_handshake_failures_total{{reason=\"{reason}\"}}"
            ))
            .await
                == Some(1.0),
            "{reason}: {}",
            tail(&lb.log(), 10)
        );
    }
    let metrics = lb.metrics().await;
    for reason in ["not_tls", "timeout", "other"] {
        let sample = format!("tether_tls_handshake_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(metric_value(&metrics, &sample), Some(0.0), "{reason}");
    }
    assert_eq!(
        metric_sum(&metrics, "tether_tls_handshakes_total", &[]),
        1.0,
        "only the good handshake completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_tls_is_upgraded_and_echoes() {
    use std::io::Read as _;
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let (lb, port) = tls_balancer(&pki.tls_section(&["site"]), &[&backend]).await;
    let ca = pki.ca_pem.clone();
    // A blocking rustls client speaking HTTP/1.1 (WebSockets are not offered over h2).
    let echoed = tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("site.test").unwrap(),
        )
        .unwrap();
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(
            b"GET /ws HTTP/1.1\r\nHost: site.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              x-session-id: ws-1\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // One masked text frame, "hi".
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | 2];
        frame.extend_from_slice(&mask);
        frame.extend(b"hi".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        tls.write_all(&frame).unwrap();
        let mut hdr = [0u8; 2];
        tls.read_exact(&mut hdr).unwrap();
        let mut payload = vec![0u8; usize::from(hdr[1] & 0x7f)];
        tls.read_exact(&mut payload).unwrap();
        String::from_utf8(payload).unwrap()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&lb.log(), 20)));
    assert_eq!(echoed, "b1:hi");
    assert!(
        eventually(WAIT, || async {
            lb.metric("tether_requests_by_protocol_total{protocol=\"http/1.1\",scheme=\"https\"}")
                .await
                .unwrap_or(0.0)
                >= 1.0
        })
        .await,
        "the upgrade was not counted once its tunnel closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_come_from_the_config() {
    let pki = Pki::new();
    pki.issue("site", &["site.test"], -1, 90);
    let backend = Backend::start("b1").await;
    let options = BalancerOptions {
        server_extra: "h2_max_concurrent_streams = 7\nh2_max_header_list_bytes = 4096\n\
                       h2_stream_window_bytes = 100000\nh2_connection_window_bytes = 3000000\n"
            .into(),
        ..BalancerOptions::default()
    };
    let (lb, port) =
        tls_balancer_with(options, &body(&pki.tls_section(&["site"]), &[&backend])).await;
    // nghttp (nghttp2-client) prints the SETTINGS frame tether sends.
    let out = Command::new("nghttp")
        .args(["-nv", "-t", "10", &format!("https://127.0.0.1:{port}/")])
        .output()
        .expect("nghttp runs (apt-get install nghttp2-client)");
    let verbose = String::from_utf8_lossy(&out.stdout);
    assert!(
        verbose.contains("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7]"),
        "nghttp did not see tether's SETTINGS:\n{verbose}"
    );
    assert!(
        verbose.contains("SETTINGS_INITIAL_WINDOW_SIZE(0x04):100000]"),
        "no stream window in tether's SETTINGS:\n{verbose}"
    );
    // The connection window grows from the protocol's 65,535 by one WINDOW_UPDATE on stream 0.
    assert!(
        verbose.contains(&format!("(window_size_increment={})", 3_000_000 - 65_535)),
        "no connection WINDOW_UPDATE to 3,000,000:\n{verbose}"
    );
    // A header list past 4 KiB is refused; a small one passes.
    let h2 = https_client(&pki, "site.test", port, false);
    let url = format!("https://site.test:{port}/");
    let big = h2.get(&url).header("x-big", "a".repeat(6000)).send().await;
    // An error is the stream reset: refused as well.
    if let Ok(resp) = big {
        assert_eq!(resp.status(), 431, "a 6 KB header list passed");
    }
    let small = h2.get(&url).header("x-small", "a".repeat(100)).send().await;
    let small = small.unwrap_or_else(|e| panic!("{e}\n{}", tail(&lb.log(), 20)));
    assert_eq!(small.status(), 200);
    assert_eq!(small.version(), reqwest::Version::HTTP_2);
}

/// `[[backend]]` of `backend` over TLS, with `extra` settings (`sni`, `ca_file`, ...).
fn tls_backend(backend: &Backend, extra: &str) -> String {
    format!("{}tls = true\n{extra}", backend.toml())
}

/// A POST with a body (Pingora's engine) and a GET (the lean engine) for `session`: their
/// statuses and the backend that answered.
async fn post_and_get(lb: &Balancer, session: &str) -> [(u16, Option<String>); 2] {
    let client = client();
    let post = client
        .post(lb.url("/submit"))
        .header(SESSION_HEADER, session)
        .body("a body")
        .send()
        .await
        .unwrap();
    let post = (
        post.status().as_u16(),
        post.headers()
            .get("x-backend-id")
            .map(|v| v.to_str().unwrap().to_owned()),
    );
    let (status, id, _) = get_backend(&client, &lb.url("/"), &[(SESSION_HEADER, session)]).await;
    [post, (status, id)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_tls_are_verified_against_a_private_ca_on_every_path() {
    let pki = Pki::new();
    // One certificate for a DNS name (sent as SNI), one for the backend's IP address (the
    // default when `sni` is not given).
    pki.issue("named", &["app.internal"], -1, 30);
    pki.issue("by-ip", &["127.0.0.1"], -1, 30);
    let b1 = Backend::start_tls("b1", pki.server_config("named")).await;
    let b2 = Backend::start_tls("b2", pki.server_config("by-ip")).await;
    let ca = pki.ca_file();
    let config = format!(
        "[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\nsources = [\"header:{SESSION_HEADER}\"]\npolicy = \"round_robin\"\n\n\
         [health]\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 200\n\n{}\n{}",
        tls_backend(
            &b1,
            &format!("sni = \"app.internal\"\nca_file = \"{}\"\n", ca.display())
        ),
        tls_backend(&b2, &format!("ca_file = \"{}\"\n", ca.display())),
    );
    let lb = Balancer::start(&config).await;
    // Health checks speak TLS too: both backends are checked and stay up.
    assert_eventually!(
        WAIT,
        b1.health_checks() >= 2 && b2.health_checks() >= 2,
        "health checks over TLS did not reach both backends\n{}",
        tail(&lb.log(), 20)
    );
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..6 {
        let session = format!("s-{i}");
        let [post, get] = post_and_get(&lb, &session).await;
        assert_eq!(post.0, 200, "POST {session}\n{}", tail(&lb.log(), 20));
        assert_eq!(get.0, 200, "GET {session}\n{}", tail(&lb.log(), 20));
        // Both engines reach the same backend for one session.
        assert_eq!(post.1, get.1, "{session}");
        seen.insert(get.1.unwrap());
    }
    assert_eq!(seen.len(), 2, "both TLS backends serve: {seen:?}");
    // The backend sees a plain client's request as such.
    assert_eq!(b1.last_headers()["x-forwarded-proto"], "http");
    // A WebSocket to a TLS backend: the tunnel runs over the backend's TLS.
    let (mut ws, id) = open_ws(&lb, "ws-1").await;
    assert_eq!(echo(&mut ws, "hi").await, format!("{id}:hi"));
    // Keep-alive over TLS: more GETs of one session reuse the pooled TLS connection.
    let client = client();
    for _ in 0..5 {
        let (status, _, _) = get_backend(&client, &lb.url("/"), &[(SESSION_HEADER, "s-0")]).await;
        assert_eq!(status, 200);
    }
    let errors = metric_sum(&lb.metrics().await, "tether_upstream_errors_total", &[]);
    assert_eq!(errors, 0.0, "{}", tail(&lb.log(), 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_certificate_its_ca_does_not_verify_gets_502_and_a_clear_log_line() {
    let pki = Pki::new();
    let stranger = Pki::named("another CA");
    pki.issue("right", &["app.internal"], -1, 30);
    stranger.issue("wrong", &["app.internal"], -1, 30);
    let ca = pki.ca_file();
    // (backend certificate, sni, what rustls says)
    let cases = [
        (
            stranger.server_config("wrong"),
            "app.internal",
            "UnknownIssuer",
        ),
        (
            pki.server_config("right"),
            "other.internal",
            "certificate not valid for name",
        ),
    ];
    for (cert, sni, why) in cases {
        let backend = Backend::start_tls("b1", cert).await;
        // The session header's affinity, and the one backend.
        let config = body("", &[])
            + &tls_backend(
                &backend,
                &format!("sni = \"{sni}\"\nca_file = \"{}\"\n", ca.display()),
            );
        let lb = Balancer::start(&config).await;
        let [post, get] = post_and_get(&lb, "s-1").await;
        assert_eq!(
            (post.0, get.0),
            (502, 502),
            "{why}\n{}",
            tail(&lb.log(), 20)
        );
        assert_eq!(backend.requests(), 0, "nothing reached the backend ({why})");
        let log = lb.log();
        let line = log
            .lines()
            .find(|l| l.contains("connect failed") && l.contains(why))
            .unwrap_or_else(|| panic!("no log line naming {why}\n{}", tail(&log, 20)));
        assert!(line.contains("backend=b1"), "{line}");
        assert_eq!(
            lb.metric("tether_upstream_errors_total{backend=\"b1\",kind=\"tls\"}")
                .await,
            Some(2.0),
            "{why}"
        );
        if why == "UnknownIssuer" {
            continue;
        }
        // A reload that fixes `sni` applies to the next connection: no restart.
        let mut lb = lb;
        lb.write_config(
            &(body("", &[])
                + &tls_backend(
                    &backend,
                    &format!("sni = \"app.internal\"\nca_file = \"{}\"\n", ca.display()),
                )),
        );
        lb.sighup();
        assert_eventually!(
            WAIT,
            post_and_get(&lb, "s-1")
                .await
                .iter()
                .all(|(status, _)| *status == 200),
            "{}",
            tail(&lb.log(), 20)
        );
    }
}
