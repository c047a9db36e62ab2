//! A certificate authority for TLS tests: a CA, a server certificate for loopback,
//! and client certificates (valid, expired, or from another CA), as PEM files in a
//! temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that writes what it issues into its directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA's certificate (PEM), to trust.
    pub ca_cert: PathBuf,
}

fn named(common_name: &str, sans: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(
        sans.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<String>>(),
    )
    .expect("subject alternative names");
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("a directory for certificates");
        let mut params = named(name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("a CA certificate");
        let ca_cert = dir.path().join("ca.pem");
        std::fs::write(&ca_cert, ca.pem()).expect("writing the CA certificate");
        Self { dir, ca, ca_cert }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn issue(&self, file: &str, mut params: CertificateParams, client: bool) -> Issued {
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.ca).expect("signing");
        let issued = Issued {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("writing a certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("writing a key");
        issued
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        let mut params = named("evmesh node", &["localhost"]);
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        self.issue("server", params, false)
    }

    /// A client certificate with this common name and DNS names.
    pub fn client(&self, common_name: &str, dns_names: &[&str]) -> Issued {
        let params = named(common_name, dns_names);
        self.issue(&format!("client-{common_name}"), params, true)
    }

    /// A client certificate that expired in 2020.
    pub fn expired_client(&self, common_name: &str) -> Issued {
        let mut params = named(common_name, &[]);
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        self.issue(&format!("expired-{common_name}"), params, true)
    }
}
