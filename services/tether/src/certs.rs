//! `tether certs`: a dev CA and node certificates for the internal plane's mutual TLS.
//!
//! `tether certs --out DIR --names edge,worker-0,shard-0` writes `DIR/ca.pem`, `DIR/ca.key`
//! (made once, reused on later runs) and `DIR/<name>.pem` + `DIR/<name>.key` per node, each
//! valid for server and client use, with the SANs `<name>` plus `--sans` (by default
//! `localhost,127.0.0.1`). A node then runs with `--tls-cert DIR/<name>.pem --tls-key
//! DIR/<name>.key --tls-ca DIR/ca.pem`. For a real deployment, issue the certificates from
//! your own PKI instead: tether only needs PEM files.

use std::path::PathBuf;

use clap::Args;
use tether_common::tls::{Authority, CA_CERT_FILE};

use crate::cli::CliError;

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory the node certificates and keys are written to (created if missing).
    #[arg(long, env = "TETHER_CERTS_OUT")]
    pub out: PathBuf,

    /// Node names, comma separated: each gets `<name>.pem` and `<name>.key`, with `<name>` as
    /// its subject and first SAN (the DNS name peers dial it by). May be empty: CA only.
    #[arg(long, env = "TETHER_CERTS_NAMES", value_delimiter = ',')]
    pub names: Vec<String>,

    /// More SANs on every node certificate (DNS names or IP addresses), comma separated.
    #[arg(long, env = "TETHER_CERTS_SANS", value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub sans: Vec<String>,

    /// Directory of the CA (`ca.pem`, `ca.key`): read when present, else made there.
    /// Defaults to --out.
    #[arg(long, env = "TETHER_CERTS_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
}

pub fn run(args: &CertsArgs) -> Result<(), CliError> {
    let config = |e: &dyn std::fmt::Display| CliError::Config(e.to_string());
    let ca_dir = args.ca_dir.clone().unwrap_or_else(|| args.out.clone());
    for dir in [&args.out, &ca_dir] {
        std::fs::create_dir_all(dir).map_err(|e| config(&format!("{}: {e}", dir.display())))?;
    }
    let authority = Authority::load_or_create(&ca_dir).map_err(|e| config(&e))?;
    let sans: Vec<String> = args.sans.iter().filter(|san| !san.is_empty()).cloned().collect();
    println!("{}", ca_dir.join(CA_CERT_FILE).display());
    for name in args.names.iter().filter(|name| !name.is_empty()) {
        let (cert, key) = authority.write_node(&args.out, name, &sans).map_err(|e| config(&e))?;
        println!("{} {}", cert.display(), key.display());
    }
    Ok(())
}
