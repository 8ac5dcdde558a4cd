//! Mutual TLS on the internal plane (edge → worker → shard, worker ↔ worker, shard ↔ shard).
//!
//! Every node holds a certificate from the cluster CA and trusts only that CA, as a server
//! (`ServerTlsConfig::client_ca_root`: a client without a certificate from the CA fails the
//! handshake and gets no answer at all) and as a client (`ClientTlsConfig`: the server must
//! present a certificate from the CA for the name in its member URL, and the client presents
//! its own). Member URLs are `https://` then. Without the three flags the plane is plaintext,
//! which `tether dev` uses on loopback.
//!
//! [`issue`] makes a dev CA and node certificates (`tether certs`, the tests, compose).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a TLS handshake may take before the server drops the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The internal plane's TLS files: all three or none.
#[derive(Clone, Debug, Default, Args)]
pub struct TlsArgs {
    /// This node's certificate (PEM, issued by the cluster CA; its SANs are the names peers
    /// dial it by). With --tls-key and --tls-ca: mutual TLS on every internal connection.
    #[arg(long, env = "TETHER_TLS_CERT", help_heading = "Internal TLS")]
    pub tls_cert: Option<PathBuf>,

    /// This node's private key (PEM).
    #[arg(long, env = "TETHER_TLS_KEY", help_heading = "Internal TLS")]
    pub tls_key: Option<PathBuf>,

    /// The cluster CA (PEM): the only issuer this node trusts, for servers and clients.
    #[arg(long, env = "TETHER_TLS_CA", help_heading = "Internal TLS")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert, --tls-key and --tls-ca go together (missing: {0})")]
    Incomplete(String),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no PEM certificate in it")]
    NotPem(PathBuf),
    #[error("the TLS files do not make a valid configuration: {0}")]
    Invalid(String),
    #[error("{0}: the address is {1} but the internal plane is {2}")]
    Scheme(String, &'static str, &'static str),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TlsArgs {
    /// Reads and checks the three files; `None` when none is given.
    pub fn load(&self) -> Result<Option<Tls>, TlsError> {
        let (cert, key, ca) = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), Some(ca)) => (cert, key, ca),
            (cert, key, ca) => {
                let missing: Vec<&str> = [(cert, "--tls-cert"), (key, "--tls-key"), (ca, "--tls-ca")]
                    .into_iter()
                    .filter(|(value, _)| value.is_none())
                    .map(|(_, flag)| flag)
                    .collect();
                return Err(TlsError::Incomplete(missing.join(", ")));
            }
        };
        let read = |path: &PathBuf| {
            let text = std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.clone(), source })?;
            if !text.contains("-----BEGIN") {
                return Err(TlsError::NotPem(path.clone()));
            }
            Ok(text)
        };
        let tls = Tls::from_pem(&read(cert)?, &read(key)?, &read(ca)?);
        tls.check()?;
        Ok(Some(tls))
    }
}

/// A node's TLS material, in memory (PEM).
#[derive(Clone)]
pub struct Tls(Arc<Pems>);

struct Pems {
    cert: String,
    key: String,
    ca: String,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tls { .. }") // never the key
    }
}

impl Tls {
    pub fn from_pem(cert: &str, key: &str, ca: &str) -> Self {
        Tls(Arc::new(Pems { cert: cert.to_owned(), key: key.to_owned(), ca: ca.to_owned() }))
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.0.cert, &self.0.key)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.0.ca)
    }

    /// The server side: this node's identity, and a client certificate from the CA required.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity()).client_ca_root(self.ca()).timeout(HANDSHAKE_TIMEOUT)
    }

    /// The client side: only servers with a certificate from the CA, and this node's identity.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca()).identity(self.identity())
    }

    /// Builds both sides once, so a bad key or CA is a configuration error at startup rather
    /// than a failed connection later.
    pub fn check(&self) -> Result<(), TlsError> {
        tonic::transport::Server::builder()
            .tls_config(self.server_config())
            .map_err(|error| TlsError::Invalid(error_chain(&error)))?;
        tonic::transport::Endpoint::from_static("https://localhost")
            .tls_config(self.client_config())
            .map_err(|error| TlsError::Invalid(error_chain(&error)))?;
        Ok(())
    }
}

/// The URL scheme of the internal plane: `https` with TLS, else `http`.
pub fn scheme(tls: Option<&Tls>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// Checks that a node address speaks the plane's scheme (`https://` with TLS, `http://` without).
pub fn check_url(addr: &str, tls: Option<&Tls>) -> Result<(), TlsError> {
    let want = scheme(tls);
    let have = addr.split_once("://").map(|(scheme, _)| scheme).unwrap_or("");
    if have.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(TlsError::Scheme(
            addr.to_owned(),
            if have.is_empty() { "without a scheme" } else { "another scheme" },
            want,
        ))
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The subject of the CA [`issue`] makes; node certificates name it as their issuer.
pub const CA_COMMON_NAME: &str = "tether cluster CA";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

/// A CA that issues node certificates.
pub struct Authority {
    cert: String,
    key: rcgen::KeyPair,
}

impl Authority {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, TlsError> {
        let key = rcgen::KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?.pem();
        Ok(Authority { cert, key })
    }

    /// A CA made by [`Authority::generate`] earlier, from its certificate and key.
    pub fn from_pem(cert: &str, key: &str) -> Result<Self, TlsError> {
        Ok(Authority { cert: cert.to_owned(), key: rcgen::KeyPair::from_pem(key)? })
    }

    /// Reads `ca.pem` and `ca.key` from `dir`, or makes and writes them when both are absent.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
        };
        if cert_path.exists() || key_path.exists() {
            return Authority::from_pem(&read(&cert_path)?, &read(&key_path)?);
        }
        let authority = Authority::generate()?;
        write_file(&cert_path, &authority.cert, false)?;
        write_file(&key_path, &authority.key.serialize_pem(), true)?;
        Ok(authority)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert
    }

    /// A node certificate for server and client use whose subject is `name` and whose SANs are
    /// `name` and `extra_sans` (DNS names or IP addresses).
    pub fn issue(&self, name: &str, extra_sans: &[String]) -> Result<Issued, TlsError> {
        let mut sans = vec![name.to_owned()];
        sans.extend(extra_sans.iter().filter(|san| san.as_str() != name).cloned());
        let mut params = rcgen::CertificateParams::new(sans)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, NODE_VALIDITY_YEARS);
        let key = rcgen::KeyPair::generate()?;
        let issuer = rcgen::Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// Issues `name`'s certificate and writes `<dir>/<name>.pem` and `<dir>/<name>.key` (0600).
    pub fn write_node(&self, dir: &Path, name: &str, extra_sans: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
        let issued = self.issue(name, extra_sans)?;
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        write_file(&cert, &issued.cert, false)?;
        write_file(&key, &issued.key, true)?;
        Ok((cert, key))
    }

    /// The TLS material of a node with a certificate from this CA (tests, `tether dev --tls`).
    pub fn node_tls(&self, name: &str, extra_sans: &[String]) -> Result<Tls, TlsError> {
        let issued = self.issue(name, extra_sans)?;
        Ok(Tls::from_pem(&issued.cert, &issued.key, &self.cert))
    }
}

const CA_VALIDITY_YEARS: i32 = 10;
const NODE_VALIDITY_YEARS: i32 = 2;

/// The CA's parameters: a node certificate's issuer is taken from them, so they must be the
/// same every time (the key identifier comes from the key).
fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY_YEARS);
    params
}

/// Valid from the start of the previous UTC day (clock skew between nodes) for `years`.
fn set_validity(params: &mut rcgen::CertificateParams, years: i32) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (year, month, day) = civil_date(now.as_secs() as i64 / 86_400 - 1);
    params.not_before = rcgen::date_time_ymd(year, month, day);
    params.not_after = rcgen::date_time_ymd(year + years, month, day.min(28));
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_date(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(if private { 0o600 } else { 0o644 });
    let write = |options: &std::fs::OpenOptions| -> std::io::Result<()> {
        let mut file = options.open(path)?;
        file.write_all(contents.as_bytes())
    };
    write(&options).map_err(|source| TlsError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_788), (2026, 12, 1));
    }

    #[test]
    fn tls_flags_go_together() {
        let args = TlsArgs { tls_cert: Some("a.pem".into()), ..TlsArgs::default() };
        let error = args.load().unwrap_err().to_string();
        assert!(error.contains("--tls-key, --tls-ca"), "{error}");
        assert!(TlsArgs::default().load().unwrap().is_none());
    }

    #[test]
    fn issued_material_makes_a_valid_configuration() {
        let ca = Authority::generate().unwrap();
        ca.node_tls("worker-0", &["localhost".into(), "127.0.0.1".into()]).unwrap().check().unwrap();
        // A CA read back from its PEMs issues certificates the same way.
        let again = Authority::from_pem(ca.cert_pem(), &ca.key.serialize_pem()).unwrap();
        again.node_tls("shard-0", &[]).unwrap().check().unwrap();
    }

    #[test]
    fn a_ca_on_disk_is_made_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("tether-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = Authority::load_or_create(&dir).unwrap();
        let again = Authority::load_or_create(&dir).unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem());
        let (cert, key) = again.write_node(&dir, "worker-0", &[]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        let args = TlsArgs { tls_cert: Some(cert), tls_key: Some(key), tls_ca: Some(dir.join(CA_CERT_FILE)) };
        assert!(args.load().unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_url_scheme_follows_the_plane() {
        let ca = Authority::generate().unwrap();
        let tls = ca.node_tls("n", &[]).unwrap();
        assert!(check_url("https://n:1", Some(&tls)).is_ok());
        assert!(check_url("http://n:1", Some(&tls)).is_err());
        assert!(check_url("http://n:1", None).is_ok());
        assert!(check_url("https://n:1", None).is_err());
    }
}
