//! What a client shows a node: TLS trust (a CA for `https://` nodes), a client
//! certificate for mTLS, and a bearer token on every call.

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{Error, Result};

/// A connection to a node that puts the caller's token on every call.
pub type Transport = InterceptedService<Channel, Authorize>;

/// TLS material and a token. The default is none of them: `http://` nodes without
/// `--auth`, and `https://` nodes whose certificate the system trusts.
#[derive(Clone, Default)]
pub struct Credentials {
    ca: Option<Certificate>,
    identity: Option<Identity>,
    token: Option<MetadataValue<Ascii>>,
}

// Never prints the token or the key.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::InvalidArgument(format!("{what} {}: {e}", path.display())))
}

impl Credentials {
    /// Trusts `https://` nodes whose certificate chains to the CA in this PEM file
    /// (instead of the system's roots).
    ///
    /// ```no_run
    /// # fn f() -> evmesh_client::Result<()> {
    /// let credentials = evmesh_client::Credentials::default().ca_file("ca.pem".as_ref())?;
    /// # Ok(()) }
    /// ```
    pub fn ca_file(mut self, path: &Path) -> Result<Self> {
        self.ca = Some(Certificate::from_pem(read(path, "CA file")?));
        Ok(self)
    }

    /// Presents this certificate (PEM chain) and key to nodes that ask for one
    /// (mTLS).
    ///
    /// ```no_run
    /// # fn f() -> evmesh_client::Result<()> {
    /// let credentials = evmesh_client::Credentials::default()
    ///     .identity_files("client.pem".as_ref(), "client.key".as_ref())?;
    /// # Ok(()) }
    /// ```
    pub fn identity_files(mut self, cert: &Path, key: &Path) -> Result<Self> {
        self.identity = Some(Identity::from_pem(
            read(cert, "certificate file")?,
            read(key, "key file")?,
        ));
        Ok(self)
    }

    /// Sends `token` as `authorization: Bearer TOKEN` on every call.
    ///
    /// ```
    /// # fn f() -> evmesh_client::Result<()> {
    /// let credentials = evmesh_client::Credentials::default().token("evm_…")?;
    /// # Ok(()) }
    /// ```
    pub fn token(mut self, token: &str) -> Result<Self> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::InvalidArgument("the token is empty".into()));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            Error::InvalidArgument(
                "the token holds characters a header cannot carry (evmesh tokens are ASCII)".into(),
            )
        })?;
        value.set_sensitive(true);
        self.token = Some(value);
        Ok(self)
    }

    /// Whether any TLS material was given.
    fn has_tls(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// The endpoint for `url`, with TLS set up for `https://` URLs. TLS material
    /// given for an `http://` URL is an error: the connection would not use it.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::InvalidArgument(format!("{url:?} is not a valid URL: {e}")))?;
        let https = url.starts_with("https://");
        if !https {
            if self.has_tls() {
                return Err(Error::InvalidArgument(format!(
                    "{url} is a plaintext URL, but a CA or client certificate was given: use https://"
                )));
            }
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        match &self.ca {
            Some(ca) => tls = tls.ca_certificate(ca.clone()),
            None => tls = tls.with_native_roots(),
        }
        if let Some(identity) = &self.identity {
            tls = tls.identity(identity.clone());
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| Error::InvalidArgument(format!("TLS for {url}: {e}")))
    }

    /// `channel` with the token on every call.
    pub fn authorize(&self, channel: Channel) -> Transport {
        InterceptedService::new(channel, Authorize(self.token.clone()))
    }
}

/// Adds the bearer token, when there is one, to each request.
#[derive(Clone)]
pub struct Authorize(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}
