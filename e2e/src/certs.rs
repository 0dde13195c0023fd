//! The control plane's PKI: a CA, the API server's serving certificate, the
//! admin client certificate (group `system:masters`) and the service-account
//! signing key, all generated fresh for each control plane; and, for a real
//! node, client certificates signed by the same CA (kubelet, kube-proxy).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{HarnessError, Result};

/// PEM files written to a folder, and the PEM text the kubeconfig embeds.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    /// The admin certificate and key as files (the API server's client
    /// certificate towards kubelets).
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    ca_params: CertificateParams,
    ca_key_pem: String,
}

/// A client certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

fn cert_err(e: rcgen::Error) -> HarnessError {
    HarnessError::Other(format!("certificate generation: {e}"))
}

impl Pki {
    /// Generates everything into `dir`. `extra_sans` are further names and
    /// addresses the API server answers on (a real node reaches it on the
    /// node address, and pods through the `kubernetes` Service's IP).
    pub fn generate(dir: &Path, extra_sans: &[String]) -> Result<Pki> {
        let err = cert_err;

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "xpyd-e2e-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().map_err(err)?;
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca_params.clone(), ca_key);

        // rustls refuses a leaf that is its own CA, so the server gets its own key.
        let mut names = vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ];
        names.extend_from_slice(extra_sans);
        let mut serving = CertificateParams::new(names).map_err(err)?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.use_authority_key_identifier_extension = true;
        let serving_key = KeyPair::generate().map_err(err)?;
        let serving_cert = serving.signed_by(&serving_key, &issuer).map_err(err)?;

        let admin = client_cert(&issuer, "admin", Some("system:masters"))?;

        let sa_key = KeyPair::generate().map_err(err)?;

        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(HarnessError::io(format!("write {}", path.display())))?;
            Ok(path)
        };
        Ok(Pki {
            ca_cert: write("ca.crt", &ca_cert.pem())?,
            serving_cert: write("apiserver.crt", &serving_cert.pem())?,
            serving_key: write("apiserver.key", &serving_key.serialize_pem())?,
            sa_key: write("service-account.key", &sa_key.serialize_pem())?,
            sa_pub: write("service-account.pub", &sa_key.public_key_pem())?,
            admin_cert: write("admin.crt", &admin.cert_pem)?,
            admin_key: write("admin.key", &admin.key_pem)?,
            ca_pem: ca_cert.pem(),
            admin_cert_pem: admin.cert_pem,
            admin_key_pem: admin.key_pem,
            ca_key_pem: issuer.key().serialize_pem(),
            ca_params,
        })
    }

    /// A client certificate for user `cn` (in `group`), signed by the CA.
    pub fn client(&self, cn: &str, group: Option<&str>) -> Result<ClientCert> {
        let key = KeyPair::from_pem(&self.ca_key_pem).map_err(cert_err)?;
        client_cert(&Issuer::new(self.ca_params.clone(), key), cn, group)
    }
}

fn client_cert(issuer: &Issuer<'_, KeyPair>, cn: &str, group: Option<&str>) -> Result<ClientCert> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(group) = group {
        params
            .distinguished_name
            .push(DnType::OrganizationName, group);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.signed_by(&key, issuer).map_err(cert_err)?;
    Ok(ClientCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
