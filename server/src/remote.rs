//! The HTTP client of another registry (a pull-through upstream, a replication target): the
//! distribution API's reads and writes, with the credentials the registry asks for: HTTP
//! basic, or the token flow (a `401` with a `Bearer` challenge names the realm that hands out
//! tokens for a scope; the token is kept per repository and access until shortly before it
//! expires). Redirects are followed (registries send blobs to storage); credentials are not
//! sent to another host.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use ballast_engine::Digest;
use bytes::Bytes;
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

/// The manifest media types asked for (what Ballast stores and serves).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Why a request to another registry did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstream says it does not have it (404).
    NotFound,
    /// No connection, a timeout, or an answer cut short.
    Unreachable(String),
    /// The upstream rate-limits this registry (429).
    RateLimited,
    /// The upstream refused the credentials (401/403 after authenticating).
    Denied(String),
    /// Any other answer (a 5xx, an unexpected status or body).
    Failed(String),
}

impl Failure {
    /// The label counted in the metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Failure::NotFound => "not_found",
            Failure::Unreachable(_) => "unreachable",
            Failure::RateLimited => "rate_limited",
            Failure::Denied(_) => "denied",
            Failure::Failed(_) => "failed",
        }
    }

    /// True when cached content should be served instead (offline mode): the upstream is
    /// down, slow, rate-limiting or failing, not saying the content is gone.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Failure::Unreachable(_) | Failure::RateLimited | Failure::Failed(_)
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound => write!(f, "not found there"),
            Failure::Unreachable(why) => write!(f, "unreachable: {why}"),
            Failure::RateLimited => write!(f, "it rate-limits this registry (429)"),
            Failure::Denied(why) => write!(f, "it refused the credentials: {why}"),
            Failure::Failed(why) => write!(f, "it failed: {why}"),
        }
    }
}

/// A bearer token for one scope.
struct Token {
    value: String,
    until: Instant,
}

/// How to reach another registry.
pub struct Options<'a> {
    /// What the config calls it, for messages (`pull_through "hub"`).
    pub what: &'a str,
    /// Its base URL.
    pub url: &'a str,
    /// Credentials.
    pub username: Option<String>,
    /// (With `username`.)
    pub password: Option<String>,
    /// A PEM file of CA certificates trusted besides the system's.
    pub ca_file: Option<&'a std::path::Path>,
    /// Seconds to connect, and between two reads of an answer.
    pub timeout_secs: u64,
}

/// The password of a table that names another registry (`[[pull_through]]`,
/// `[[replication]]`): `password`, or `password_file`'s content without its line end; it
/// goes with `username`. `at` names the table in errors.
pub fn password(
    at: &str,
    username: Option<&str>,
    password: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    let password = match (password, file) {
        (Some(_), Some(_)) => anyhow::bail!("{at}: set password or password_file, not both"),
        (Some(p), None) => Some(p.to_owned()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("{at}: reading password_file {}", f.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    if password.is_some() != username.is_some() {
        anyhow::bail!("{at}: username and a password go together");
    }
    Ok(password)
}

/// A client of another registry.
pub struct Client {
    http: reqwest::Client,
    /// `scheme://host[:port]`, no trailing slash.
    base: String,
    basic: Option<(String, String)>,
    /// Bearer tokens by scope.
    tokens: Mutex<HashMap<String, Token>>,
}

/// Blob uploads are sent in pieces of at most this many bytes (one PUT below it, PATCHes
/// then a PUT above it).
pub const UPLOAD_PIECE: usize = 16 << 20;

impl Client {
    /// Builds the client (its CA file read now).
    pub fn new(o: Options<'_>) -> anyhow::Result<Client> {
        let timeout = Duration::from_secs(o.timeout_secs);
        let mut http = reqwest::Client::builder()
            .connect_timeout(timeout)
            // Between two reads of a body, not the whole transfer (layers are large).
            .read_timeout(timeout)
            .user_agent(concat!("ballast/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = o.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("{}: reading ca_file {}", o.what, ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!(
                    "{}: ca_file {} is not PEM certificates",
                    o.what,
                    ca.display()
                )
            })? {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Client {
            http: http
                .build()
                .with_context(|| format!("{}: its HTTP client", o.what))?,
            base: o.url.trim_end_matches('/').to_owned(),
            basic: o.username.zip(o.password),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// `HEAD` of a manifest: its digest (when the upstream names it) and media type.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(Option<Digest>, Option<String>), Failure> {
        let r = self
            .send(
                Method::HEAD,
                repo,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?;
        Ok((content_digest(r.headers()), content_type(r.headers())))
    }

    /// `GET` of a manifest, at most `max` bytes: its bytes, media type and the digest the
    /// upstream names (checked by the caller).
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        max: usize,
    ) -> Result<(Vec<u8>, Option<String>, Option<Digest>), Failure> {
        let mut r = self
            .send(
                Method::GET,
                repo,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?;
        let (ct, digest) = (content_type(r.headers()), content_digest(r.headers()));
        let mut bytes = Vec::new();
        while let Some(c) = r.chunk().await.map_err(unreachable)? {
            if bytes.len() + c.len() > max {
                return Err(Failure::Failed(format!(
                    "the manifest is larger than manifest_bytes_max ({max} bytes)"
                )));
            }
            bytes.extend_from_slice(&c);
        }
        Ok((bytes, ct, digest))
    }

    /// `HEAD` of a blob: its size.
    pub async fn head_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, Failure> {
        let r = self
            .send(Method::HEAD, repo, &format!("blobs/{digest}"), None)
            .await?;
        Ok(r.headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// `GET` of a blob: the response, its body still to read.
    pub async fn get_blob(&self, repo: &str, digest: &Digest) -> Result<Response, Failure> {
        self.send(Method::GET, repo, &format!("blobs/{digest}"), None)
            .await
    }

    /// `PUT` of a manifest, by tag or digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<(), Failure> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let headers = [(CONTENT_TYPE, media_type.to_owned())];
        self.send_url(Method::PUT, &url, repo, true, &headers, Some(bytes))
            .await
            .map(drop)
    }

    /// `DELETE` of a manifest, by tag or digest.
    pub async fn delete_manifest(&self, repo: &str, reference: &str) -> Result<(), Failure> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        self.send_url(Method::DELETE, &url, repo, true, &[], None)
            .await
            .map(drop)
    }

    /// The repository's tags (every page).
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, Failure> {
        let mut url = format!("{}/v2/{repo}/tags/list?n=1000", self.base);
        let mut out = Vec::new();
        loop {
            let r = self
                .send_url(Method::GET, &url, repo, false, &[], None)
                .await?;
            let next = r
                .headers()
                .get(reqwest::header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| l.split(';').next())
                .map(|l| {
                    l.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                });
            let bytes = r.bytes().await.map_err(unreachable)?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| Failure::Failed(format!("its tag list: {e}")))?;
            out.extend(
                v["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str().map(str::to_owned)),
            );
            match next {
                Some(n) if !n.is_empty() => url = self.resolve(&n),
                _ => return Ok(out),
            }
        }
    }

    /// Asks for a cross-repository mount of a blob from `from`: true when it is in `repo`
    /// now (201), false when the registry would rather have it uploaded.
    pub async fn mount_blob(
        &self,
        repo: &str,
        digest: &Digest,
        from: &str,
    ) -> Result<bool, Failure> {
        let url = format!(
            "{}/v2/{repo}/blobs/uploads/?mount={digest}&from={from}",
            self.base
        );
        // (The token must also allow pulling from `from`.)
        let r = self
            .send_scoped(
                Method::POST,
                &url,
                repo,
                true,
                Some(&format!("repository:{from}:pull")),
                &[],
                None,
            )
            .await?;
        if r.status() == StatusCode::CREATED {
            return Ok(true);
        }
        // (The session it opened instead is left to expire.)
        Ok(false)
    }

    /// Uploads a blob of `size` bytes from `pieces` (at most [`UPLOAD_PIECE`] bytes each):
    /// one `PUT` when it fits in a piece, `PATCH`es then a `PUT` otherwise. The registry
    /// checks the digest.
    pub async fn upload_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        mut pieces: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    ) -> Result<(), Failure> {
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let r = self
            .send_url(Method::POST, &url, repo, true, &[], None)
            .await?;
        let mut location = self.location(&r)?;
        let with_digest = |loc: &str| {
            let sep = if loc.contains('?') { '&' } else { '?' };
            format!("{loc}{sep}digest={digest}")
        };
        let octets = (CONTENT_TYPE, "application/octet-stream".to_owned());
        if size <= UPLOAD_PIECE as u64 {
            let mut body = Vec::with_capacity(size as usize);
            while let Some(p) = pieces.recv().await {
                body.extend_from_slice(&p.map_err(Failure::Failed)?);
            }
            self.send_url(
                Method::PUT,
                &with_digest(&location),
                repo,
                true,
                &[octets],
                Some(Bytes::from(body)),
            )
            .await?;
            return Ok(());
        }
        let mut offset = 0u64;
        while let Some(p) = pieces.recv().await {
            let p = p.map_err(Failure::Failed)?;
            let range = (
                reqwest::header::CONTENT_RANGE,
                format!("{offset}-{}", offset + p.len() as u64 - 1),
            );
            offset += p.len() as u64;
            let r = self
                .send_url(
                    Method::PATCH,
                    &location,
                    repo,
                    true,
                    &[octets.clone(), range],
                    Some(p),
                )
                .await?;
            location = self.location(&r)?;
        }
        self.send_url(Method::PUT, &with_digest(&location), repo, true, &[], None)
            .await
            .map(drop)
    }

    /// An upload's next URL, from an answer's `Location`.
    fn location(&self, r: &Response) -> Result<String, Failure> {
        let loc = r
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Failure::Failed("an upload answer without a Location".into()))?;
        Ok(self.resolve(loc))
    }

    /// A URL the registry sent, made absolute.
    fn resolve(&self, url: &str) -> String {
        if url.starts_with("http://") || url.starts_with("https://") {
            url.to_owned()
        } else {
            format!("{}{url}", self.base)
        }
    }

    /// A read of `/v2/<repo>/<path>`.
    async fn send(
        &self,
        method: Method,
        repo: &str,
        path: &str,
        accept: Option<&str>,
    ) -> Result<Response, Failure> {
        let url = format!("{}/v2/{repo}/{path}", self.base);
        let headers: Vec<_> = accept.map(|a| (ACCEPT, a.to_owned())).into_iter().collect();
        self.send_url(method, &url, repo, false, &headers, None)
            .await
    }

    /// Sends a request about `repo` (`push`: it writes), answering one authentication
    /// challenge; a success or the failure it is.
    async fn send_url(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        push: bool,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<Response, Failure> {
        self.send_scoped(method, url, repo, push, None, headers, body)
            .await
    }

    /// [`Self::send_url`] whose token also needs `extra` (a scope).
    #[allow(clippy::too_many_arguments)]
    async fn send_scoped(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        push: bool,
        extra: Option<&str>,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<Response, Failure> {
        let r = self
            .exchange(method.clone(), url, repo, push, extra, headers, body)
            .await?;
        if r.status().is_success() {
            return Ok(r);
        }
        Err(failure(&method, url, r).await)
    }

    /// Sends a request, answering one authentication challenge; the answer whatever its
    /// status (after a second 401, that one).
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        push: bool,
        extra: Option<&str>,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<Response, Failure> {
        let mut scope = if push {
            format!("repository:{repo}:pull,push")
        } else {
            format!("repository:{repo}:pull")
        };
        if let Some(e) = extra {
            scope.push(' ');
            scope.push_str(e);
        }
        let mut auth = self.cached_token(&scope).map(|t| format!("Bearer {t}"));
        let mut challenged = false;
        loop {
            let mut req = self.http.request(method.clone(), url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(a) = &auth {
                req = req.header(AUTHORIZATION, a);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let r = req.send().await.map_err(unreachable)?;
            if r.status() == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = r
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                auth = Some(self.answer(&challenge, &scope).await?);
                continue;
            }
            return Ok(r);
        }
    }

    /// Which of `ids` the registry (a Ballast) lacks for `repo` (`POST
    /// /v2/_ballast/<repo>/chunks/missing`). A registry without the extension answers
    /// [`Failure::NotFound`] or another refusal.
    pub async fn chunks_missing(
        &self,
        repo: &str,
        ids: &[ballast_engine::ChunkId],
    ) -> Result<Vec<ballast_engine::ChunkId>, Failure> {
        let url = format!("{}/v2/_ballast/{repo}/chunks/missing", self.base);
        let body = ballast_engine::delta::encode_ids(ids);
        let r = self
            .send_url(
                Method::POST,
                &url,
                repo,
                true,
                &[octet_stream()],
                Some(Bytes::from(body)),
            )
            .await?;
        let bytes = r.bytes().await.map_err(unreachable)?;
        ballast_engine::delta::decode_ids(&bytes)
            .map_err(|why| Failure::Failed(format!("POST {url}: {why}")))
    }

    /// A blob's recipe (`encode_wire`) from a Ballast (`GET
    /// /v2/_ballast/<repo>/blobs/<digest>/recipe`): [`Failure::NotFound`] when it says the
    /// blob is not there, [`Failure::Failed`] when the registry has no such endpoint.
    pub async fn get_recipe(&self, repo: &str, digest: &Digest) -> Result<Bytes, Failure> {
        let url = format!("{}/v2/_ballast/{repo}/blobs/{digest}/recipe", self.base);
        let r = self
            .exchange(Method::GET, &url, repo, false, None, &[], None)
            .await?;
        let status = r.status();
        if status.is_success() {
            return r.bytes().await.map_err(unreachable);
        }
        if status != StatusCode::NOT_FOUND {
            return Err(failure(&Method::GET, &url, r).await);
        }
        // Ballast's 404 is an OCI error; another registry's is its router's.
        let body = r.bytes().await.unwrap_or_default();
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned));
        match code.as_deref() {
            Some("BLOB_UNKNOWN" | "NAME_UNKNOWN") => Err(Failure::NotFound),
            _ => Err(Failure::Failed(format!(
                "GET {url}: 404 without an OCI error: no delta endpoints"
            ))),
        }
    }

    /// Chunks of a blob from a Ballast, by id (`POST
    /// /v2/_ballast/<repo>/blobs/<digest>/chunks`): as many as it answers at once, in order.
    pub async fn fetch_chunks(
        &self,
        repo: &str,
        digest: &Digest,
        ids: &[ballast_engine::ChunkId],
    ) -> Result<Vec<(ballast_engine::ChunkId, Bytes)>, Failure> {
        let url = format!("{}/v2/_ballast/{repo}/blobs/{digest}/chunks", self.base);
        let body = ballast_engine::delta::encode_ids(ids);
        let r = self
            .send_url(
                Method::POST,
                &url,
                repo,
                false,
                &[octet_stream()],
                Some(Bytes::from(body)),
            )
            .await?;
        let bytes = r.bytes().await.map_err(unreachable)?;
        ballast_engine::delta::decode_frames(&bytes)
            .map_err(|why| Failure::Failed(format!("POST {url}: {why}")))
    }

    /// Sends chunks (frames of id, u32 length, bytes) for `repo`.
    pub async fn post_chunks(&self, repo: &str, frames: Bytes) -> Result<(), Failure> {
        let url = format!("{}/v2/_ballast/{repo}/chunks", self.base);
        self.send_url(
            Method::POST,
            &url,
            repo,
            true,
            &[octet_stream()],
            Some(frames),
        )
        .await
        .map(drop)
    }

    /// Commits a blob in `repo` from its recipe (`encode_wire`): `Ok(vec![])` when it is
    /// there, or the chunks the registry says it lacks.
    pub async fn put_recipe(
        &self,
        repo: &str,
        digest: &Digest,
        recipe: Bytes,
    ) -> Result<Vec<ballast_engine::ChunkId>, Failure> {
        let url = format!("{}/v2/_ballast/{repo}/blobs/{digest}", self.base);
        let r = self
            .exchange(
                Method::PUT,
                &url,
                repo,
                true,
                None,
                &[octet_stream()],
                Some(recipe),
            )
            .await?;
        if r.status().is_success() {
            return Ok(Vec::new());
        }
        if r.status() != StatusCode::BAD_REQUEST {
            return Err(failure(&Method::PUT, &url, r).await);
        }
        let bytes = r.bytes().await.map_err(unreachable)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let e = &v["errors"][0];
        let missing: Vec<ballast_engine::ChunkId> = e["detail"]["missing"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str())
            .filter_map(|h| hex::decode(h).ok())
            .filter_map(|b| <[u8; 32]>::try_from(b).ok())
            .map(ballast_engine::ChunkId)
            .collect();
        if missing.is_empty() {
            return Err(Failure::Failed(format!(
                "PUT {url}: 400 {}: {}",
                e["code"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            )));
        }
        Ok(missing)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock();
        tokens
            .get(scope)
            .filter(|t| t.until > Instant::now())
            .map(|t| t.value.clone())
    }

    /// The `Authorization` value that answers a challenge.
    async fn answer(&self, challenge: &str, scope: &str) -> Result<String, Failure> {
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            return match &self.basic {
                Some((u, p)) => Ok(basic(u, p)),
                None => Err(Failure::Denied(
                    "it asks for a username and password; set username and password_file".into(),
                )),
            };
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Failure::Denied(format!(
                "unsupported authentication challenge {challenge:?}"
            )));
        }
        let realm = params.get("realm").ok_or_else(|| {
            Failure::Denied(format!("a Bearer challenge without a realm: {challenge:?}"))
        })?;
        // Asked for: the scope the registry names, when it does, and ours (several, space
        // separated); the token is kept under ours, which the next request of the kind
        // looks up.
        let mut asked: Vec<&str> = params
            .get("scope")
            .map(String::as_str)
            .into_iter()
            .collect();
        for s in scope.split(' ') {
            if !asked.contains(&s) {
                asked.push(s);
            }
        }
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            if let Some(s) = params.get("service") {
                q.append_pair("service", s);
            }
            for s in &asked {
                q.append_pair("scope", s);
            }
            q.finish()
        };
        let sep = if realm.contains('?') { '&' } else { '?' };
        let mut req = self.http.get(format!("{realm}{sep}{query}"));
        if let Some((u, p)) = &self.basic {
            req = req.header(AUTHORIZATION, basic(u, p));
        }
        let r = req.send().await.map_err(unreachable)?;
        let status = r.status();
        if !status.is_success() {
            return Err(if status == StatusCode::TOO_MANY_REQUESTS {
                Failure::RateLimited
            } else if status.is_server_error() {
                Failure::Failed(format!("the token service {realm} answered {status}"))
            } else {
                Failure::Denied(format!("the token service {realm} answered {status}"))
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenBody {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let bytes = r.bytes().await.map_err(unreachable)?;
        let body: TokenBody = serde_json::from_slice(&bytes)
            .map_err(|e| Failure::Failed(format!("the token service {realm}: {e}")))?;
        let value = body
            .token
            .or(body.access_token)
            .ok_or_else(|| Failure::Failed(format!("the token service {realm} sent no token")))?;
        // Kept until 10 s before it expires (60 s when the service does not say: the
        // spec's default).
        let life = body.expires_in.unwrap_or(60).saturating_sub(10);
        self.tokens.lock().insert(
            scope.to_owned(),
            Token {
                value: value.clone(),
                until: Instant::now() + Duration::from_secs(life),
            },
        );
        Ok(format!("Bearer {value}"))
    }
}

fn octet_stream() -> (reqwest::header::HeaderName, String) {
    (CONTENT_TYPE, "application/octet-stream".to_owned())
}

/// The failure an answer that is not a success says (its OCI error in the message).
async fn failure(method: &Method, url: &str, r: Response) -> Failure {
    let status = r.status();
    let said = match *method {
        Method::HEAD => String::new(),
        _ => r
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                let e = &v["errors"][0];
                Some(format!(
                    " {}: {}",
                    e["code"].as_str()?,
                    e["message"].as_str().unwrap_or("")
                ))
            })
            .unwrap_or_default(),
    };
    match status {
        StatusCode::NOT_FOUND => Failure::NotFound,
        StatusCode::TOO_MANY_REQUESTS => Failure::RateLimited,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Failure::Denied(format!("{method} {url}: {status}{said}"))
        }
        s => Failure::Failed(format!("{method} {url}: {s}{said}")),
    }
}

fn unreachable(e: reqwest::Error) -> Failure {
    // (The source chain says why: connection refused, timed out, ...)
    let mut why = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        why.push_str(&format!(": {s}"));
        source = s.source();
    }
    Failure::Unreachable(why)
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn content_digest(h: &HeaderMap) -> Option<Digest> {
    h.get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn content_type(h: &HeaderMap) -> Option<String> {
    h.get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Splits `Scheme k="v",k2=v2` into the scheme and its parameters.
pub fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            // A quoted string: up to the closing quote, `\"` escaped.
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, value);
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_owned(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("Basic", "Registry Realm")
        );
        let (_, p) = parse_challenge(r#"Bearer realm=x, error="a \"b\"""#);
        assert_eq!((p["realm"].as_str(), p["error"].as_str()), ("x", "a \"b\""));
        let (s, p) = parse_challenge("Bearer");
        assert_eq!((s.as_str(), p.len()), ("Bearer", 0));
    }
}
