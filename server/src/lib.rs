//! Ballast's OCI distribution server: tokio + hyper at the edge, the storage engine behind.

pub mod audit;
pub mod auth;
pub mod body;
pub mod bucket_cmd;
pub mod cache;
pub mod cli;
pub mod config;
pub mod console;
pub mod error;
mod gc;
pub mod governance;
mod guard;
mod handlers;
pub mod logbuf;
pub mod metrics;
pub mod pulls;
pub mod remote;
pub mod replication;
pub mod reqlog;
pub mod routes;
mod sendfile;
pub mod tag;
mod tls;
pub mod upstream;
pub mod webhooks;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ballast_engine::Store;
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ResBody;
pub use crate::cache::{CachedManifest, ManifestCache};
pub use crate::config::Config;

/// What every handler shares.
pub struct App {
    /// The storage engine (blobs, catalog, uploads).
    pub store: Store,
    /// Effective configuration.
    pub config: Config,
    /// Manifest bytes by digest (immutable, so never stale), bounded in bytes.
    pub manifests: ManifestCache,
    /// Upload sessions (the engine keeps their writers warm between requests).
    pub uploads: ballast_engine::Uploads,
    /// Accounts, policy and tokens.
    pub auth: Arc<auth::Auth>,
    /// The audit log.
    pub audit: audit::Audit,
    /// What `/metrics` tells (counted only with `metrics = true`).
    pub metrics: Arc<metrics::Metrics>,
    /// Webhook endpoints and their outbox.
    pub webhooks: Arc<webhooks::Webhooks>,
    /// Tag immutability rules (replaced by a reload: [`Server::reload`]).
    immutable: parking_lot::RwLock<Arc<governance::ImmutableRules>>,
    /// Retention rules (replaced by a reload).
    retention: parking_lot::RwLock<Arc<governance::Retention>>,
    /// Quotas and their usage (followed through the catalog).
    pub quotas: Arc<governance::Quotas>,
    /// Manifest pulls waiting to be committed to the catalog.
    pub pulls: pulls::PullRecorder,
    /// The pull-through cache's upstreams.
    pub pull_through: upstream::PullThrough,
    /// Replication rules.
    pub replication: Vec<Arc<replication::Rule>>,
    /// The web console's sessions and figures.
    pub console: console::Console,
    /// The last collection that changed something: when, what started it, its report.
    pub last_gc: parking_lot::Mutex<Option<(u64, String, serde_json::Value)>>,
    /// Ships checkpoints to the bucket, when `[bucket]` is configured (a primary).
    pub bucket: Option<Arc<ballast_bucket::Shipper>>,
    /// Follows the primary's checkpoints, on a read replica (`role = "replica"`).
    pub replica: Option<Arc<ballast_bucket::Follower>>,
}

impl App {
    /// The tag immutability rules in force.
    pub fn immutable(&self) -> Arc<governance::ImmutableRules> {
        self.immutable.read().clone()
    }

    /// The retention rules in force.
    pub fn retention(&self) -> Arc<governance::Retention> {
        self.retention.read().clone()
    }

    /// How slowly a request body may arrive, starting now; its bytes are counted in the
    /// metrics.
    pub fn body_pace(&self) -> body::Pace {
        self.config.body_pace().counting(
            self.config
                .metrics
                .then(|| self.metrics.received_bytes.clone()),
        )
    }
}

/// A running server.
pub struct Server {
    app: Arc<App>,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Opens the store and binds the listener; requests are served on the current runtime.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        for w in config.check()? {
            tracing::warn!("{w}");
        }
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => Some(tls::acceptor(c, k)?),
            _ => None,
        };
        if !config.is_replica() {
            bucket_cmd::restore_if_empty(&config).await?;
        }
        let data = config.data.clone();
        let opts = config.engine_options();
        let store = tokio::task::spawn_blocking(move || Store::open(&data, opts))
            .await?
            .with_context(|| format!("opening the data directory {}", config.data.display()))?;
        for w in store.open_warnings() {
            tracing::warn!("{w}");
        }
        if config.read_ahead.effective() != config.read_ahead {
            tracing::warn!(
                "read_ahead is \"uring\" but this process cannot set up an io_uring queue (an \
                 old kernel, or a seccomp profile or sysctl that forbids it): reading ahead with \
                 page-cache hints (\"advise\") instead"
            );
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let auth = Arc::new(auth::Auth::new(&config)?);
        let audit_path = config.audit_path();
        let audit = audit::Audit::open(
            &audit_path,
            config.audit_log_bytes_max,
            config.audit_log_keep,
        )
        .with_context(|| format!("opening the audit log {}", audit_path.display()))?;
        let uploads = ballast_engine::Uploads::with_limits(&store, config.upload_limits());
        let pull_through =
            upstream::PullThrough::new(upstream::compile(&config.pull_through)?, &config.data)?;
        let (endpoints, _) = webhooks::compile(&config.webhooks)?;
        let replication = replication::compile(&config.replication)?;
        let subscribers = replication::subscribers(&replication);
        let hooks = {
            let (store, bytes_max) = (store.clone(), config.webhook_outbox_bytes_max);
            let (source, base) = (config.base_url(), config.base_url());
            tokio::task::spawn_blocking(move || {
                webhooks::Webhooks::open(&store, endpoints, subscribers, bytes_max, source, base)
            })
            .await??
        };
        let hooks = Arc::new(hooks);
        let (bucket, replica) = match &config.bucket {
            Some(b) if config.is_replica() => {
                let follower = ballast_bucket::Follower::new(store.clone(), &config.data, b)?;
                // Serves what it has when the bucket does not answer at start.
                let first = tokio::time::timeout(Duration::from_secs(30), follower.follow()).await;
                match first {
                    Ok(Ok(Some(r))) => tracing::info!(
                        seq = r.seq,
                        segments = r.added,
                        "replica following the primary's checkpoint"
                    ),
                    Ok(Ok(None)) => tracing::warn!(
                        bucket = follower.bucket().describe(),
                        "the bucket holds no checkpoint yet: this replica serves an empty \
                         registry until its primary ships one"
                    ),
                    Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "could not follow the primary's checkpoint at start; serving what this replica has and trying again"),
                    Err(_) => tracing::warn!("the bucket did not answer within 30 s at start; serving what this replica has and trying again"),
                }
                (None, Some(follower))
            }
            Some(b) => {
                let shipper = ballast_bucket::Shipper::new(store.clone(), &config.data, b)?;
                // Where replicas send writers: public_url, else the address bound (a
                // port of 0 resolved).
                shipper.advertise(match config.public_url {
                    Some(_) => config.base_url(),
                    None => format!("{}://{addr}", if config.tls() { "https" } else { "http" }),
                });
                // Refuses to start while another registry ships to the prefix.
                shipper.acquire(Duration::from_secs(5)).await?;
                (Some(shipper), None)
            }
            None => (None, None),
        };
        let metrics = Arc::new(metrics::Metrics::new(
            store.clone(),
            uploads.clone(),
            hooks.clone(),
            pull_through.upstreams().to_vec(),
            replication.clone(),
            bucket.clone(),
            replica.clone(),
        ));
        let metrics_listener = match config.metrics_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding metrics_listen {a}"))?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let app = Arc::new(App {
            bucket,
            replica,
            uploads,
            metrics,
            webhooks: hooks,
            immutable: parking_lot::RwLock::new(Arc::new(governance::ImmutableRules::compile(
                &config.immutable_tags,
            )?)),
            pulls: pulls::PullRecorder::default(),
            pull_through,
            replication,
            quotas: {
                let (store, rules) = (store.clone(), config.quotas.clone());
                tokio::task::spawn_blocking(move || governance::Quotas::install(&store, &rules))
                    .await??
            },
            retention: parking_lot::RwLock::new(Arc::new(governance::Retention::compile(
                &config.retention,
            )?)),
            console: console::Console::new(&config),
            last_gc: parking_lot::Mutex::new(None),
            store,
            config,
            manifests: ManifestCache::default(),
            auth,
            audit,
        });
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            app.clone(),
            listener,
            metrics_listener,
            tls,
            rx,
        ));
        Ok(Server {
            app,
            addr,
            metrics_addr,
            shutdown: tx,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the policies of a config read again (SIGHUP): tag immutability and retention
    /// rules. Both are compiled before either is replaced, so a config with an error changes
    /// nothing (the error says what is wrong). Audited as `config.reload`. Other settings
    /// (listeners, webhooks, limits) need a restart.
    /// `config` is the config as loaded again (an error loading it is audited and changes
    /// nothing).
    pub async fn reload(&self, config: anyhow::Result<Config>) -> anyhow::Result<()> {
        let compiled = config.and_then(|mut config| {
            // (The flags given at start still hold.)
            config.listen = self.app.config.listen;
            config.data = self.app.config.data.clone();
            config.check()?;
            let immutable = governance::ImmutableRules::compile(&config.immutable_tags)?;
            let retention = governance::Retention::compile(&config.retention)?;
            Ok((config, immutable, retention))
        });
        let mut e = audit::Event::new("system", "config.reload");
        match compiled {
            Ok((config, immutable, retention)) => {
                *self.app.immutable.write() = Arc::new(immutable);
                *self.app.retention.write() = Arc::new(retention);
                e.reason = Some(format!(
                    "{} immutable_tags rules, {} retention rules",
                    config.immutable_tags.len(),
                    config.retention.rules.len()
                ));
                self.app.audit.record(e).await;
                Ok(())
            }
            Err(err) => {
                e.outcome = "failed".into();
                e.reason = Some(format!("{err:#}; the rules before stay in force"));
                self.app.audit.record(e).await;
                Err(err)
            }
        }
    }

    /// The address of the metrics listener, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting, lets in-flight requests finish (bounded), and closes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await?
    }

    /// Waits until the server stops by itself (it only does on error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await?
    }
}

async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let expire = tokio::spawn(expire_uploads(app.clone()));
    let metrics_task = metrics_listener.map(|l| tokio::spawn(serve_metrics(app.clone(), l)));
    let liveness = tokio::spawn(metrics::refresh_liveness(app.clone()));
    let deliveries = app.webhooks.start();
    let disk = tokio::spawn(watch_disk(app.clone()));
    // What writes to the store runs on a primary only: a replica's content is its
    // primary's (collections, retention and pull counts happen there; a replica reports
    // its pulls through the bucket).
    let mut writers = vec![tokio::spawn(pulls::flush_loop(app.clone()))];
    if app.replica.is_none() {
        writers.push(tokio::spawn(gc::scheduled(app.clone())));
        writers.push(tokio::spawn(governance::retention::scheduled(app.clone())));
        writers.push(tokio::spawn(upstream::evict::scheduled(app.clone())));
        writers.extend(replication::start(&app));
    }
    let (follow_stop, follow_stopped) = watch::channel(false);
    let follower = app
        .replica
        .clone()
        .map(|f| tokio::spawn(f.run(follow_stopped)));
    // The shipper stops last (after the requests in flight), shipping once more.
    let (bucket_stop, bucket_stopped) = watch::channel(false);
    let shipper = app.bucket.clone().map(|s| {
        let grace = Duration::from_secs(app.config.shutdown_grace_secs);
        tokio::spawn(s.run(bucket_stopped, grace))
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let watcher = graceful.watcher();
                let app = app.clone();
                match &tls {
                    None => {
                        let stream = sendfile::SendfileStream::new(
                            stream,
                            app.config.sendfile,
                            app.metrics.sendfile_bytes.clone(),
                        );
                        tokio::spawn(serve_connection(app, stream, peer, false, watcher));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            // The handshake counts against the header timeout.
                            let timeout = app.config.header_timeout();
                            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                                    serve_connection(app, tls, peer, h2, watcher).await
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    expire.abort();
    disk.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    liveness.abort();
    for w in writers {
        w.abort();
    }
    let _ = follow_stop.send(true);
    if let Some(f) = follower {
        let _ = f.await;
    }
    // (An event being sent is sent again at the next start: at least once.)
    for d in deliveries {
        d.abort();
    }
    let grace = Duration::from_secs(app.config.shutdown_grace_secs);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight requests did not finish within {} s; closing anyway",
            grace.as_secs()
        );
    }
    // The pulls counted since the last flush (a replica's report waits at most 10 s for
    // the bucket; the primary takes reports in at its next start).
    if app.config.pull_tracking && app.replica.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(10), pulls::flush(&app, false)).await;
    } else if app.config.pull_tracking {
        pulls::flush(&app, false).await;
    }
    if let Some(task) = shipper {
        let _ = bucket_stop.send(true);
        let _ = task.await;
    }
    let store = app.store.clone();
    drop(app);
    tokio::task::spawn_blocking(move || store.close())
        .await?
        .context("closing the store")?;
    tracing::info!("store closed");
    Ok(())
}

/// Serves one connection, HTTP/2 when ALPN chose it, HTTP/1.1 otherwise.
async fn serve_connection<I>(
    app: Arc<App>,
    io: I,
    peer: SocketAddr,
    h2: bool,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = app.config.header_timeout();
    let svc = service_fn(move |req| handle(app.clone(), peer, req));
    let io = TokioIo::new(io);
    let result = if h2 {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(1 << 20)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(header_timeout);
        watcher.watch(b.serve_connection(io, svc)).await
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(1 << 20)
            .serve_connection(io, svc);
        watcher.watch(conn).await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The `metrics_listen` listener: `GET /metrics` and nothing else, without auth.
async fn serve_metrics(app: Arc<App>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let app = app.clone();
                async move {
                    let res = if req.uri().path() != "/metrics" {
                        error::response(&error::ApiError::NotFound(
                            "this listener (metrics_listen) serves /metrics only".into(),
                        ))
                    } else if req.method() != hyper::Method::GET {
                        error::response(&error::ApiError::MethodNotAllowed(
                            "/metrics takes GET".into(),
                        ))
                    } else {
                        handlers::metrics(&app)
                            .await
                            .unwrap_or_else(|e| error::response(&e))
                    };
                    Ok::<_, Infallible>(res)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
        });
    }
}

async fn expire_uploads(app: Arc<App>) {
    loop {
        let uploads = app.uploads.clone();
        let cutoff = now_secs().saturating_sub(app.config.upload_max_age_secs);
        match tokio::task::spawn_blocking(move || uploads.expire(cutoff)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(sessions = n, "expired idle upload sessions"),
            Ok(Err(e)) => tracing::warn!(error = %e, "expiring upload sessions failed"),
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Warns in the log while the data directory's file system is within twice the free-space
/// floor (pushes are refused below it): when it gets there, then every ten minutes while it
/// stays, and once when it has room again.
async fn watch_disk(app: Arc<App>) {
    let floor = app.config.disk_free_min_bytes;
    if floor == 0 {
        return;
    }
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let store = app.store.clone();
        let free = tokio::task::spawn_blocking(move || store.free_bytes())
            .await
            .ok()
            .flatten();
        match free {
            Some(free)
                if free < floor.saturating_mul(2)
                    && warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(600)) =>
            {
                tracing::warn!(
                    free_bytes = free,
                    floor_bytes = floor,
                    "the data directory's file system is nearly full: pushes are refused \
                     below disk_free_min_bytes; delete images and run gc, or grow it"
                );
                warned = Some(std::time::Instant::now());
            }
            Some(free) if free < floor.saturating_mul(2) => {}
            Some(_) if warned.is_some() => {
                tracing::info!("the data directory's file system has room again");
                warned = None;
            }
            _ => {}
        }
        // A statvfs: cheap enough to look often.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

pub use ballast_engine::clock::now_secs;

/// Validates manifest bytes as `PUT /v2/<name>/manifests/<ref>` does (for the fuzz target).
pub use handlers::validate_manifest;

async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ResBody>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let id = guard::RequestId::new();
    req.extensions_mut().insert(id.clone());
    // Counted down when the request ends, also when the client goes away mid-request (the
    // future is dropped).
    let _in_flight = app.config.metrics.then(|| InFlight::enter(&app.metrics));
    let req = req.map(body::ReqBody::Wire);
    let console = app.config.console && (console::serves(&path) || console::browser_at_root(&req));
    let mut res = if console {
        console::serve(&app, peer, req).await
    } else {
        guard::serve(&app, peer, req).await
    };
    if method == hyper::Method::HEAD {
        // A HEAD response has headers only, whatever made it (errors carry a JSON body).
        // HTTP/1.1 drops the body by itself; hyper's HTTP/2 would send it as DATA frames,
        // which the protocol forbids after a HEAD, and strict clients reset the stream.
        // Content-Length stays: it tells the size a GET would have.
        *res.body_mut() = body::empty();
    }
    if let Ok(v) = hyper::header::HeaderValue::from_str(id.as_str()) {
        res.headers_mut().insert(guard::REQUEST_ID_HEADER, v);
    }
    let status = res.status().as_u16();
    // A number when the length is known (absent for streamed bodies without one).
    let bytes: Option<u64> = res
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let secs = started.elapsed().as_secs_f64();
    if app.config.metrics {
        let m = &app.metrics;
        if console {
            m.console_request(&method, status, secs);
        } else {
            m.request(
                routes::route(&path).map(|r| r.kind()),
                &method,
                status,
                secs,
            );
        }
        if method != hyper::Method::HEAD {
            if let Some(b) = bytes {
                m.sent_bytes.inc_by(b);
            }
        }
        if status == 429 {
            m.rate_limited.inc();
        }
    }
    let actor = res
        .extensions()
        .get::<guard::Actor>()
        .map_or("-", |a| a.0.as_str());
    reqlog::emit(&reqlog::Line {
        peer,
        actor,
        request_id: id.as_str(),
        method: method.as_str(),
        path: &path,
        status,
        bytes,
        secs,
    });
    Ok(res)
}

/// One request in flight, for the gauge.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn enter(m: &metrics::Metrics) -> InFlight {
        m.in_flight.inc();
        InFlight(m.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
