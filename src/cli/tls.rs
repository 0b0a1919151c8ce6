//! `trellis tls ca create` and `trellis tls cert create`: files named as Consul names them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::tls::{self, CertKind};

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Certificate authority
    #[command(subcommand)]
    Ca(CaCommand),
    /// Agent certificates
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a CA: trellis-agent-ca.pem and trellis-agent-ca-key.pem in the current directory
    Create {
        /// Domain the CA signs for
        #[arg(long, default_value = crate::config::DEFAULT_DOMAIN)]
        domain: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a certificate signed by the CA: <dc>-<server|client>-trellis-N.pem and -key.pem
    Create {
        #[arg(long)]
        server: bool,
        #[arg(long)]
        client: bool,
        #[arg(long, default_value = crate::config::DEFAULT_DATACENTER)]
        dc: String,
        #[arg(long, default_value = crate::config::DEFAULT_DOMAIN)]
        domain: String,
        /// CA certificate
        #[arg(long, default_value = tls::CA_CERT_FILE)]
        ca: PathBuf,
        /// CA private key
        #[arg(long, default_value = tls::CA_KEY_FILE)]
        key: PathBuf,
        /// Extra DNS names for the certificate (repeatable)
        #[arg(long = "additional-dnsname")]
        additional_dnsname: Vec<String>,
    },
}

pub fn run(cmd: TlsCommand) -> anyhow::Result<()> {
    let here = Path::new(".");
    match cmd {
        TlsCommand::Ca(CaCommand::Create { domain }) => {
            for f in [tls::CA_CERT_FILE, tls::CA_KEY_FILE] {
                if here.join(f).exists() {
                    bail!("{f} already exists; not overwriting it");
                }
            }
            let (cert, key) = tls::create_ca(&domain)?;
            tls::write(&here.join(tls::CA_CERT_FILE), &cert)?;
            tls::write(&here.join(tls::CA_KEY_FILE), &key)?;
            println!("==> Saved {}\n==> Saved {}", tls::CA_CERT_FILE, tls::CA_KEY_FILE);
            Ok(())
        }
        TlsCommand::Cert(CertCommand::Create { server, client, dc, domain, ca, key, additional_dnsname }) => {
            let kind = match (server, client) {
                (true, false) => CertKind::Server,
                (false, true) => CertKind::Client,
                _ => bail!("choose exactly one of --server or --client"),
            };
            let ca_pem = tls::read(&ca).with_context(|| "run `trellis tls ca create` first")?;
            let ca_key = tls::read(&key).with_context(|| "run `trellis tls ca create` first")?;
            let (cert, k) = tls::create_cert(&ca_pem, &ca_key, kind, &dc, &domain, &additional_dnsname)?;
            let prefix = format!("{dc}-{}-trellis", if kind == CertKind::Server { "server" } else { "client" });
            let (c, kp) = tls::write_numbered(here, &prefix, &cert, &k)?;
            println!("==> Using {} and {}\n==> Saved {}\n==> Saved {}", ca.display(), key.display(), c.display(), kp.display());
            Ok(())
        }
    }
}
