//! TLS for clients: certificate files loaded and checked before anything uses them (`tether
//! check`, start-up and every reload go through [`load`], so Pingora's `TlsSettings`, which
//! panics on a bad file, never sees one), and the certificate for each handshake chosen by SNI
//! ([`SniResolver`]), swapped in memory on reload: new handshakes take the new certificates,
//! open connections keep theirs.
//!
//! A certificate serves the DNS names of its subjectAltName extension (its subject's CN when it
//! has none), exactly or by a `*.example.com` wildcard (one label, as RFC 6125 section 6.4.3
//! allows); a client without SNI, or naming a host no certificate has, gets the first
//! certificate configured.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A certificate expiring sooner than this is a warning from `tether check` and at load.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 24 * 3600;

/// One certificate chain and its key, loaded and checked.
#[derive(Clone)]
pub struct Certificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub key: Arc<CertifiedKey>,
    /// The DNS names it serves, lowercase (`*.example.com` for a wildcard).
    pub names: Vec<String>,
    /// Its leaf's notAfter, Unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for Certificate {
    // No key material, not even its bytes' length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.key.cert == other.key.cert
    }
}

/// What [`load`] found wrong with a pair of files, and which of them.
#[derive(Debug)]
pub struct LoadError {
    /// The key file (not the certificate file) is the problem.
    pub in_key: bool,
    pub message: String,
}

fn cert_error(message: impl Into<String>) -> LoadError {
    LoadError {
        in_key: false,
        message: message.into(),
    }
}

fn key_error(message: impl Into<String>) -> LoadError {
    LoadError {
        in_key: true,
        message: message.into(),
    }
}

/// Load the PEM chain at `cert_path` (leaf first, each certificate issued by the next) and the
/// private key at `key_path` (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or Ed25519), at `now` (Unix
/// seconds): the key must match the leaf, and the leaf must be valid now. `Ok` carries a
/// warning when it expires within [`EXPIRY_WARNING_SECS`].
pub fn load(
    cert_path: &Path,
    key_path: &Path,
    now: i64,
) -> Result<(Certificate, Option<String>), LoadError> {
    let pem = crate::config::read_file_capped(cert_path, crate::config::MAX_PEM_FILE)
        .map_err(|e| cert_error(format!("cannot read {}: {e}", cert_path.display())))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(format!("{}: not valid PEM: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(cert_error(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            cert_path.display()
        )));
    }
    let key_pem = crate::config::read_file_capped(key_path, crate::config::MAX_PEM_FILE)
        .map_err(|e| key_error(format!("cannot read {}: {e}", key_path.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        key_error(format!(
            "{} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            key_path.display()
        ))
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        key_error(format!(
            "{}: not an RSA, ECDSA or Ed25519 key tether can sign with: {e}",
            key_path.display()
        ))
    })?;

    let mut parsed = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            cert_error(format!(
                "{}: certificate {} is not valid X.509: {e}",
                cert_path.display(),
                i + 1
            ))
        })?;
        parsed.push(cert);
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            return Err(cert_error(format!(
                "{}: certificate {} is not issued by certificate {} (the chain must go from the \
                 server's certificate up towards the root, in order)",
                cert_path.display(),
                i + 1,
                i + 2
            )));
        }
    }
    let leaf = &parsed[0];
    let certified = CertifiedKey::new(chain.clone(), signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(key_error(format!(
                "{} is not the key of the certificate in {}",
                key_path.display(),
                cert_path.display()
            )));
        }
    }
    let validity = leaf.validity();
    let not_after = validity.not_after.timestamp();
    if validity.not_before.timestamp() > now {
        return Err(cert_error(format!(
            "{}: not valid before {}",
            cert_path.display(),
            validity.not_before
        )));
    }
    if not_after <= now {
        return Err(cert_error(format!(
            "{}: expired on {}",
            cert_path.display(),
            validity.not_after
        )));
    }
    let warning = (not_after - now < EXPIRY_WARNING_SECS).then(|| {
        format!(
            "{}: expires on {}, in {} days",
            cert_path.display(),
            validity.not_after,
            (not_after - now) / 86_400
        )
    });
    let names = names_of(leaf);
    if names.is_empty() {
        return Err(cert_error(format!(
            "{}: the certificate names no DNS name (subjectAltName or CN)",
            cert_path.display()
        )));
    }
    Ok((
        Certificate {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            key: Arc::new(certified),
            names,
            not_after,
        },
        warning,
    ))
}

/// The DNS names a certificate serves: its subjectAltName DNS entries, or its CN without them.
fn names_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

/// The certificates of the TLS listeners, by the names they serve.
#[derive(Debug)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertStore {
    /// `certs` must not be empty (config validation sees to it); the first is the default, and
    /// where two serve a name the first configured wins.
    pub fn new(certs: &[Certificate]) -> CertStore {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| c.key.clone());
            }
        }
        CertStore {
            exact,
            wildcard,
            default: certs[0].key.clone(),
        }
    }

    /// The certificate for a handshake naming `sni` (already lowercase, as rustls gives it).
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(sni) = sni else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(sni) {
            return k.clone();
        }
        sni.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

/// rustls's certificate resolver for every TLS listener: the current [`CertStore`].
#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub fn new(certs: &[Certificate]) -> SniResolver {
        export_expiry(certs);
        SniResolver {
            store: ArcSwap::from_pointee(CertStore::new(certs)),
        }
    }

    /// New handshakes use `certs` from now on.
    pub fn replace(&self, certs: &[Certificate]) {
        self.store.store(Arc::new(CertStore::new(certs)));
        export_expiry(certs);
    }
}

/// Set the expiry gauge of every certificate in `certs` (and drop those no longer configured).
pub fn export_expiry(certs: &[Certificate]) {
    let gauge = &crate::metrics::Metrics::get().tls_cert_expiry;
    gauge.reset();
    for c in certs {
        gauge
            .with_label_values(&[c.names[0].as_str()])
            .set(c.not_after);
    }
}

/// Pingora's hook after each TLS handshake: counts it by TLS version.
pub struct HandshakeCounter;

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for HandshakeCounter {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        // rustls's names (the listeners offer nothing else).
        let version = match tls.version() {
            Some("TLSv1_3") => "1.3",
            Some("TLSv1_2") => "1.2",
            _ => "other",
        };
        crate::metrics::Metrics::get()
            .tls_handshakes
            .with_label_values(&[version])
            .inc();
        None
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.load().pick(hello.server_name()))
    }
}

/// Why a TLS handshake on a listener failed: the `reason` of
/// `tether_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The bytes were no TLS ClientHello (plain HTTP to the TLS port, a scanner's garbage).
    NotTls,
    /// No TLS version, cipher suite or ALPN protocol in common.
    Incompatible,
    /// The client sent an alert: it refused the handshake (our certificate, often).
    ClientAlert,
    /// The client closed or reset the connection mid-handshake.
    Closed,
    /// Not done within Pingora's handshake timeout (60 s).
    Timeout,
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::NotTls,
        HandshakeFailure::Incompatible,
        HandshakeFailure::ClientAlert,
        HandshakeFailure::Closed,
        HandshakeFailure::Timeout,
        HandshakeFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::ClientAlert => "client_alert",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    /// The failure a line of Pingora's listener reports, if it reports one. Pingora 0.9 says
    /// nothing else about a failed handshake than its ERROR line ("Downstream handshake error
    /// from ADDR: ..." with rustls's error, or "Downstream handshake timeout"), and has no
    /// callback for it: the line is read here (tests/tls.rs checks every reason still parses).
    pub fn of_log_line(target: &str, message: &str) -> Option<HandshakeFailure> {
        if target != "pingora_core::services::listening" {
            return None;
        }
        if message.starts_with("Downstream handshake timeout") {
            return Some(HandshakeFailure::Timeout);
        }
        if !message.starts_with("Downstream handshake error") {
            return None;
        }
        let has = |needles: &[&str]| needles.iter().any(|n| message.contains(n));
        // rustls's `Error` texts (rustls 0.23), then the io errors of a connection that ended.
        Some(if has(&["corrupt message", "unexpected message"]) {
            HandshakeFailure::NotTls
        } else if has(&["peer is incompatible", "doesn't support any known protocol"]) {
            HandshakeFailure::Incompatible
        } else if has(&["received fatal alert"]) {
            HandshakeFailure::ClientAlert
        } else if has(&["eof", "reset by peer", "Broken pipe", "connection closed"]) {
            HandshakeFailure::Closed
        } else {
            HandshakeFailure::Other
        })
    }
}

/// A tracing layer that counts failed TLS handshakes from Pingora's log lines
/// ([`HandshakeFailure::of_log_line`]), whatever `RUST_LOG` lets through to the log. Install it
/// with a per-layer filter at ERROR (`with_filter(LevelFilter::ERROR)`): as a plain layer it
/// would either veto every other line (a plain layer's `Interest::never` is global) or ask for
/// every span.
pub struct HandshakeFailures;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for HandshakeFailures {
    fn on_event(&self, event: &tracing::Event<'_>, _cx: tracing_subscriber::layer::Context<'_, S>) {
        use tracing_log::NormalizeEvent;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        // The per-layer filter lets only ERROR through; `of_log_line` checks the target.
        if !meta.target().starts_with("pingora_core") {
            return;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if let Some(reason) = HandshakeFailure::of_log_line(meta.target(), &message.0) {
            crate::metrics::Metrics::get().tls_handshake_failures[reason as usize].inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HandshakeFailure::{self, *};

    const LISTENING: &str = "pingora_core::services::listening";

    #[test]
    fn pingora_handshake_lines_map_to_reasons() {
        // The lines tests/tls.rs cannot wait for (the timeout is 60 s) or should never see.
        assert_eq!(
            HandshakeFailure::of_log_line(LISTENING, "Downstream handshake timeout"),
            Some(Timeout)
        );
        let error = |cause: &str| {
            HandshakeFailure::of_log_line(
                LISTENING,
                &format!(
                    "Downstream handshake error from 127.0.0.1:5000: TLSHandshakeFailure context: TLS accept() failed: {cause}"
                ),
            )
        };
        assert_eq!(error("something new"), Some(Other));
        assert_eq!(error("received fatal alert: UnknownCA"), Some(ClientAlert));
        // Other lines of the listener, and the same words elsewhere, are no handshake failure.
        assert_eq!(
            HandshakeFailure::of_log_line(LISTENING, "Accept() failed eof"),
            None
        );
        assert_eq!(
            HandshakeFailure::of_log_line("pingora_proxy", "Downstream handshake timeout"),
            None
        );
        // Every reason has its own slot, in `ALL`'s order (the metric handles are indexed so).
        for (i, r) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
