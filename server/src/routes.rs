//! The endpoint table: every endpoint of the server once, with the methods it takes, what a
//! request to it needs to be allowed, and what the audit log records of it. Routing, the
//! authorization check, dispatch and the audit plan all read it (`guard.rs`).

use hyper::Method;

use crate::auth::Action;

/// A path of the distribution API (and the server's own), with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags { name: &'a str },
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: &'a str },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: &'a str, id: &'a str },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: &'a str, digest: &'a str },
    /// `/v2/_ballast/<name>/chunks/missing`: which chunks a repository's store lacks.
    DeltaMissing { name: &'a str },
    /// `/v2/_ballast/<name>/chunks`: chunks sent by id.
    DeltaChunks { name: &'a str },
    /// `/v2/_ballast/<name>/blobs/<digest>`: a blob committed from its recipe.
    DeltaBlob { name: &'a str, digest: &'a str },
    /// `/v2/_ballast/<name>/blobs/<digest>/recipe`: a blob's recipe.
    DeltaRecipe { name: &'a str, digest: &'a str },
    /// `/v2/_ballast/<name>/blobs/<digest>/chunks`: chunks of a blob, by id.
    DeltaFetch { name: &'a str, digest: &'a str },
    /// `/healthz`
    Health,
    /// `/admin/gc`: run a garbage collection now.
    AdminGc,
    /// `/token`: the token endpoint of the Docker token flow.
    Token,
    /// `/metrics`: Prometheus metrics.
    Metrics,
    /// `/admin/retention`: run retention now.
    AdminRetention,
    /// `/admin/usage`: quota usage per namespace.
    AdminUsage,
    /// `/admin/webhooks`: each endpoint's state.
    AdminWebhooks,
    /// `/admin/webhooks/dead`: the dead letters.
    AdminWebhooksDead,
    /// `/admin/webhooks/dead/redeliver`: send dead letters again.
    AdminWebhooksRedeliver,
    /// `/admin/pull-through`: each upstream's state.
    AdminPullThrough,
    /// `/admin/pull-through/evict`: run the cache's eviction now.
    AdminPullThroughEvict,
    /// `/admin/replication`: each replication rule's state.
    AdminReplication,
    /// `/admin/replication/reconcile`: reconcile now.
    AdminReplicationReconcile,
    /// `/admin/bucket`: shipping to the bucket.
    AdminBucket,
    /// `/admin/bucket/ship`: ship a checkpoint now.
    AdminBucketShip,
    /// `/admin/bucket/follow`: a replica follows the newest checkpoint now.
    AdminBucketFollow,
    /// `/admin/robots`: the robot accounts.
    AdminRobots,
    /// `/admin/robots/<name>`: one robot account.
    AdminRobot { name: &'a str },
    /// `/admin/audit`: the audit log, newest first.
    AdminAudit,
}

/// Which path an endpoint serves (a [`Route`] without its parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags,
    /// `/v2/<name>/manifests/<reference>`
    Manifest,
    /// `/v2/<name>/blobs/<digest>`
    Blob,
    /// `/v2/<name>/blobs/uploads/`
    UploadStart,
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload,
    /// `/v2/<name>/referrers/<digest>`
    Referrers,
    /// `/v2/_ballast/<name>/chunks/missing`
    DeltaMissing,
    /// `/v2/_ballast/<name>/chunks`
    DeltaChunks,
    /// `/v2/_ballast/<name>/blobs/<digest>`
    DeltaBlob,
    /// `/v2/_ballast/<name>/blobs/<digest>/recipe`
    DeltaRecipe,
    /// `/v2/_ballast/<name>/blobs/<digest>/chunks`
    DeltaFetch,
    /// `/healthz`
    Health,
    /// `/admin/gc`
    AdminGc,
    /// `/token`
    Token,
    /// `/metrics`
    Metrics,
    /// `/admin/retention`
    AdminRetention,
    /// `/admin/usage`
    AdminUsage,
    /// `/admin/webhooks`
    AdminWebhooks,
    /// `/admin/webhooks/dead`
    AdminWebhooksDead,
    /// `/admin/webhooks/dead/redeliver`
    AdminWebhooksRedeliver,
    /// `/admin/pull-through`
    AdminPullThrough,
    /// `/admin/pull-through/evict`
    AdminPullThroughEvict,
    /// `/admin/replication`
    AdminReplication,
    /// `/admin/replication/reconcile`
    AdminReplicationReconcile,
    /// `/admin/bucket`
    AdminBucket,
    /// `/admin/bucket/ship`
    AdminBucketShip,
    /// `/admin/bucket/follow`
    AdminBucketFollow,
    /// `/admin/robots`
    AdminRobots,
    /// `/admin/robots/<name>`
    AdminRobot,
    /// `/admin/audit`
    AdminAudit,
}

impl Route<'_> {
    /// The path this route is of.
    pub fn kind(&self) -> PathKind {
        match self {
            Route::Base => PathKind::Base,
            Route::Catalog => PathKind::Catalog,
            Route::Tags { .. } => PathKind::Tags,
            Route::Manifest { .. } => PathKind::Manifest,
            Route::Blob { .. } => PathKind::Blob,
            Route::UploadStart { .. } => PathKind::UploadStart,
            Route::Upload { .. } => PathKind::Upload,
            Route::Referrers { .. } => PathKind::Referrers,
            Route::DeltaMissing { .. } => PathKind::DeltaMissing,
            Route::DeltaChunks { .. } => PathKind::DeltaChunks,
            Route::DeltaBlob { .. } => PathKind::DeltaBlob,
            Route::DeltaRecipe { .. } => PathKind::DeltaRecipe,
            Route::DeltaFetch { .. } => PathKind::DeltaFetch,
            Route::Health => PathKind::Health,
            Route::AdminGc => PathKind::AdminGc,
            Route::Token => PathKind::Token,
            Route::Metrics => PathKind::Metrics,
            Route::AdminRetention => PathKind::AdminRetention,
            Route::AdminUsage => PathKind::AdminUsage,
            Route::AdminWebhooks => PathKind::AdminWebhooks,
            Route::AdminWebhooksDead => PathKind::AdminWebhooksDead,
            Route::AdminWebhooksRedeliver => PathKind::AdminWebhooksRedeliver,
            Route::AdminPullThrough => PathKind::AdminPullThrough,
            Route::AdminPullThroughEvict => PathKind::AdminPullThroughEvict,
            Route::AdminReplication => PathKind::AdminReplication,
            Route::AdminReplicationReconcile => PathKind::AdminReplicationReconcile,
            Route::AdminBucket => PathKind::AdminBucket,
            Route::AdminBucketShip => PathKind::AdminBucketShip,
            Route::AdminBucketFollow => PathKind::AdminBucketFollow,
            Route::AdminRobots => PathKind::AdminRobots,
            Route::AdminRobot { .. } => PathKind::AdminRobot,
            Route::AdminAudit => PathKind::AdminAudit,
        }
    }

    /// The repository the path names, if any.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Tags { name }
            | Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Referrers { name, .. }
            | Route::DeltaMissing { name }
            | Route::DeltaChunks { name }
            | Route::DeltaBlob { name, .. }
            | Route::DeltaRecipe { name, .. }
            | Route::DeltaFetch { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Every endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET|HEAD /v2/`: the API version check.
    Base,
    /// `GET|HEAD /healthz`.
    Health,
    /// `GET|POST /token`.
    Token,
    /// `POST /admin/gc`.
    AdminGc,
    /// `GET /metrics`.
    Metrics,
    /// `POST /admin/retention`.
    AdminRetention,
    /// `GET /admin/usage`.
    AdminUsage,
    /// `GET /admin/webhooks`.
    AdminWebhooks,
    /// `GET /admin/webhooks/dead`.
    AdminWebhooksDead,
    /// `POST /admin/webhooks/dead/redeliver`.
    AdminWebhooksRedeliver,
    /// `GET /admin/pull-through`.
    AdminPullThrough,
    /// `POST /admin/pull-through/evict`.
    AdminPullThroughEvict,
    /// `GET /admin/replication`.
    AdminReplication,
    /// `POST /admin/replication/reconcile`.
    AdminReplicationReconcile,
    /// `GET /admin/bucket`.
    AdminBucket,
    /// `POST /admin/bucket/ship`.
    AdminBucketShip,
    /// `POST /admin/bucket/follow`.
    AdminBucketFollow,
    /// `GET /admin/robots`: the robots (never their tokens).
    AdminRobots,
    /// `POST /admin/robots?name=…`: a new robot; its token is in the answer, once.
    AdminRobotCreate,
    /// `DELETE /admin/robots/<name>`.
    AdminRobotRevoke,
    /// `GET /admin/audit`: audit lines, newest first, filtered and paged.
    AdminAudit,
    /// `GET /v2/_catalog`.
    Catalog,
    /// `GET /v2/<name>/tags/list`.
    Tags,
    /// `GET /v2/<name>/referrers/<digest>`.
    Referrers,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`.
    ManifestGet,
    /// `PUT /v2/<name>/manifests/<reference>`.
    ManifestPut,
    /// `DELETE /v2/<name>/manifests/<reference>`.
    ManifestDelete,
    /// `GET|HEAD /v2/<name>/blobs/<digest>`.
    BlobGet,
    /// `DELETE /v2/<name>/blobs/<digest>`.
    BlobDelete,
    /// `POST /v2/<name>/blobs/uploads/`: a session, a monolithic upload, or a mount.
    UploadStart,
    /// `PATCH /v2/<name>/blobs/uploads/<id>`.
    UploadPatch,
    /// `PUT /v2/<name>/blobs/uploads/<id>`.
    UploadFinish,
    /// `GET /v2/<name>/blobs/uploads/<id>`.
    UploadStatus,
    /// `DELETE /v2/<name>/blobs/uploads/<id>`.
    UploadCancel,
    /// `POST /v2/_ballast/<name>/chunks/missing`.
    DeltaMissing,
    /// `POST /v2/_ballast/<name>/chunks`.
    DeltaChunks,
    /// `PUT /v2/_ballast/<name>/blobs/<digest>`.
    DeltaBlob,
    /// `GET /v2/_ballast/<name>/blobs/<digest>/recipe`.
    DeltaRecipe,
    /// `POST /v2/_ballast/<name>/blobs/<digest>/chunks`.
    DeltaFetch,
}

/// What a request to an endpoint needs to be allowed (auth.rs decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requires {
    /// Nothing (health checks, the token endpoint).
    Nothing,
    /// Any valid credentials or token.
    Authenticated,
    /// An action on the repository the path names.
    Repo(Action),
    /// The repository catalog (filtered by what the caller may pull).
    Catalog,
    /// The registry's admin endpoints.
    Admin,
}

/// What the audit log records of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audit {
    /// A read: not audited (the request log has it).
    Read,
    /// A change, audited as this kind (guard.rs builds its lines).
    Change(AuditKind),
    /// Part of a change that is audited at another endpoint: the bytes of a chunked upload
    /// are audited when the upload finishes.
    AtEnd(Endpoint),
}

/// The kinds of audited changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditKind {
    /// `manifest.put`, and `tag.move` for each tag it moves.
    ManifestPut,
    /// `manifest.delete`, or `tag.delete` by tag.
    ManifestDelete,
    /// `blob.upload` (monolithic) or `blob.mount`; starting a session changes nothing.
    UploadStart,
    /// `blob.upload`.
    UploadFinish,
    /// `upload.cancel`.
    UploadCancel,
    /// `blob.delete`.
    BlobDelete,
    /// `gc.run`.
    Gc,
    /// `webhook.redeliver`.
    WebhookRedeliver,
    /// `retention.run` (each deletion is audited by the run).
    Retention,
    /// `pull_through.evict` (what it evicted is audited by the run).
    PullThroughEvict,
    /// `replication.reconcile` (each copy and delete is audited as it is done).
    ReplicationReconcile,
    /// `bucket.ship`.
    BucketShip,
    /// `bucket.follow`.
    BucketFollow,
    /// `blob.upload` of a blob committed from its recipe (delta replication).
    DeltaBlob,
    /// `chunks.upload`: chunks sent for blobs to come (delta replication).
    DeltaChunks,
    /// `robot.create`.
    RobotCreate,
    /// `robot.revoke`.
    RobotRevoke,
}

/// One endpoint: its methods and path, what it requires, what is audited.
#[derive(Debug)]
pub struct Descriptor {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The methods it answers.
    pub methods: &'static [Method],
    /// The path it serves.
    pub path: PathKind,
    /// What a request needs.
    pub requires: Requires,
    /// What the audit log records.
    pub audit: Audit,
}

const GET: &[Method] = &[Method::GET];
const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];

macro_rules! endpoint {
    ($e:ident, $methods:expr, $path:ident, $requires:expr, $audit:expr) => {
        Descriptor {
            endpoint: Endpoint::$e,
            methods: $methods,
            path: PathKind::$path,
            requires: $requires,
            audit: $audit,
        }
    };
}

/// The table. For each path, the first endpoint listed also decides what a request with a
/// method the path does not take needs before it is answered 405 (so a 405 tells an
/// unauthorized caller nothing a 401 would not).
pub static ENDPOINTS: &[Descriptor] = &[
    endpoint!(Base, GET_HEAD, Base, Requires::Authenticated, Audit::Read),
    endpoint!(Health, GET_HEAD, Health, Requires::Nothing, Audit::Read),
    endpoint!(
        Token,
        &[Method::GET, Method::POST],
        Token,
        Requires::Nothing,
        Audit::Read
    ),
    endpoint!(
        AdminGc,
        &[Method::POST],
        AdminGc,
        Requires::Admin,
        Audit::Change(AuditKind::Gc)
    ),
    endpoint!(Metrics, GET, Metrics, Requires::Admin, Audit::Read),
    endpoint!(AdminUsage, GET, AdminUsage, Requires::Admin, Audit::Read),
    endpoint!(
        AdminRetention,
        &[Method::POST],
        AdminRetention,
        Requires::Admin,
        Audit::Change(AuditKind::Retention)
    ),
    endpoint!(
        AdminPullThrough,
        GET,
        AdminPullThrough,
        Requires::Admin,
        Audit::Read
    ),
    endpoint!(
        AdminPullThroughEvict,
        &[Method::POST],
        AdminPullThroughEvict,
        Requires::Admin,
        Audit::Change(AuditKind::PullThroughEvict)
    ),
    endpoint!(
        AdminReplication,
        GET,
        AdminReplication,
        Requires::Admin,
        Audit::Read
    ),
    endpoint!(
        AdminReplicationReconcile,
        &[Method::POST],
        AdminReplicationReconcile,
        Requires::Admin,
        Audit::Change(AuditKind::ReplicationReconcile)
    ),
    endpoint!(AdminBucket, GET, AdminBucket, Requires::Admin, Audit::Read),
    endpoint!(
        AdminBucketShip,
        &[Method::POST],
        AdminBucketShip,
        Requires::Admin,
        Audit::Change(AuditKind::BucketShip)
    ),
    endpoint!(
        AdminBucketFollow,
        &[Method::POST],
        AdminBucketFollow,
        Requires::Admin,
        Audit::Change(AuditKind::BucketFollow)
    ),
    endpoint!(
        AdminWebhooks,
        GET,
        AdminWebhooks,
        Requires::Admin,
        Audit::Read
    ),
    endpoint!(
        AdminWebhooksDead,
        GET,
        AdminWebhooksDead,
        Requires::Admin,
        Audit::Read
    ),
    endpoint!(
        AdminWebhooksRedeliver,
        &[Method::POST],
        AdminWebhooksRedeliver,
        Requires::Admin,
        Audit::Change(AuditKind::WebhookRedeliver)
    ),
    endpoint!(AdminRobots, GET, AdminRobots, Requires::Admin, Audit::Read),
    endpoint!(
        AdminRobotCreate,
        &[Method::POST],
        AdminRobots,
        Requires::Admin,
        Audit::Change(AuditKind::RobotCreate)
    ),
    endpoint!(
        AdminRobotRevoke,
        &[Method::DELETE],
        AdminRobot,
        Requires::Admin,
        Audit::Change(AuditKind::RobotRevoke)
    ),
    endpoint!(AdminAudit, GET, AdminAudit, Requires::Admin, Audit::Read),
    endpoint!(Catalog, GET, Catalog, Requires::Catalog, Audit::Read),
    endpoint!(Tags, GET, Tags, Requires::Repo(Action::Pull), Audit::Read),
    endpoint!(
        Referrers,
        GET,
        Referrers,
        Requires::Repo(Action::Pull),
        Audit::Read
    ),
    endpoint!(
        ManifestGet,
        GET_HEAD,
        Manifest,
        Requires::Repo(Action::Pull),
        Audit::Read
    ),
    endpoint!(
        ManifestPut,
        &[Method::PUT],
        Manifest,
        Requires::Repo(Action::Push),
        Audit::Change(AuditKind::ManifestPut)
    ),
    endpoint!(
        ManifestDelete,
        &[Method::DELETE],
        Manifest,
        Requires::Repo(Action::Delete),
        Audit::Change(AuditKind::ManifestDelete)
    ),
    endpoint!(
        BlobGet,
        GET_HEAD,
        Blob,
        Requires::Repo(Action::Pull),
        Audit::Read
    ),
    endpoint!(
        BlobDelete,
        &[Method::DELETE],
        Blob,
        Requires::Repo(Action::Delete),
        Audit::Change(AuditKind::BlobDelete)
    ),
    endpoint!(
        UploadStart,
        &[Method::POST],
        UploadStart,
        Requires::Repo(Action::Push),
        Audit::Change(AuditKind::UploadStart)
    ),
    endpoint!(
        UploadPatch,
        &[Method::PATCH],
        Upload,
        Requires::Repo(Action::Push),
        Audit::AtEnd(Endpoint::UploadFinish)
    ),
    endpoint!(
        UploadFinish,
        &[Method::PUT],
        Upload,
        Requires::Repo(Action::Push),
        Audit::Change(AuditKind::UploadFinish)
    ),
    endpoint!(
        UploadStatus,
        GET,
        Upload,
        Requires::Repo(Action::Push),
        Audit::Read
    ),
    endpoint!(
        UploadCancel,
        &[Method::DELETE],
        Upload,
        Requires::Repo(Action::Push),
        Audit::Change(AuditKind::UploadCancel)
    ),
    endpoint!(
        DeltaMissing,
        &[Method::POST],
        DeltaMissing,
        Requires::Repo(Action::Push),
        Audit::Read
    ),
    endpoint!(
        DeltaChunks,
        &[Method::POST],
        DeltaChunks,
        Requires::Repo(Action::Push),
        Audit::Change(AuditKind::DeltaChunks)
    ),
    endpoint!(
        DeltaBlob,
        &[Method::PUT],
        DeltaBlob,
        Requires::Repo(Action::Push),
        Audit::Change(AuditKind::DeltaBlob)
    ),
    endpoint!(
        DeltaRecipe,
        GET,
        DeltaRecipe,
        Requires::Repo(Action::Pull),
        Audit::Read
    ),
    endpoint!(
        DeltaFetch,
        &[Method::POST],
        DeltaFetch,
        Requires::Repo(Action::Pull),
        Audit::Read
    ),
];

/// What a request resolves to.
pub enum Resolved<'a> {
    /// No endpoint has this path.
    NotFound,
    /// The path exists, not with this method: answered 405 once the caller passes what the
    /// path's first endpoint requires.
    MethodNotAllowed(&'static Descriptor, Route<'a>),
    /// The endpoint and the path's parameters.
    Found(&'static Descriptor, Route<'a>),
}

/// Resolves a request to its endpoint.
pub fn resolve<'a>(method: &Method, path: &'a str) -> Resolved<'a> {
    let Some(r) = route(path) else {
        return Resolved::NotFound;
    };
    let kind = r.kind();
    let mut of_path = ENDPOINTS.iter().filter(|d| d.path == kind).peekable();
    let Some(&first) = of_path.peek() else {
        return Resolved::NotFound;
    };
    match of_path.find(|d| d.methods.contains(method)) {
        Some(d) => Resolved::Found(d, r),
        None => Resolved::MethodNotAllowed(first, r),
    }
}

/// The descriptor of an endpoint (every endpoint is in the table: a test checks it).
pub fn descriptor(e: Endpoint) -> Option<&'static Descriptor> {
    ENDPOINTS.iter().find(|d| d.endpoint == e)
}

/// Resolves a request path. Repository names may contain `/`, and even path components such
/// as `blobs`, so each pattern is matched from the end.
pub fn route(path: &str) -> Option<Route<'_>> {
    if path == "/healthz" {
        return Some(Route::Health);
    }
    if path == "/admin/gc" {
        return Some(Route::AdminGc);
    }
    if path == "/token" {
        return Some(Route::Token);
    }
    if path == "/metrics" {
        return Some(Route::Metrics);
    }
    match path {
        "/admin/retention" => return Some(Route::AdminRetention),
        "/admin/usage" => return Some(Route::AdminUsage),
        "/admin/webhooks" => return Some(Route::AdminWebhooks),
        "/admin/webhooks/dead" => return Some(Route::AdminWebhooksDead),
        "/admin/webhooks/dead/redeliver" => return Some(Route::AdminWebhooksRedeliver),
        "/admin/pull-through" => return Some(Route::AdminPullThrough),
        "/admin/pull-through/evict" => return Some(Route::AdminPullThroughEvict),
        "/admin/replication" => return Some(Route::AdminReplication),
        "/admin/replication/reconcile" => return Some(Route::AdminReplicationReconcile),
        "/admin/bucket" => return Some(Route::AdminBucket),
        "/admin/bucket/ship" => return Some(Route::AdminBucketShip),
        "/admin/bucket/follow" => return Some(Route::AdminBucketFollow),
        "/admin/robots" => return Some(Route::AdminRobots),
        "/admin/audit" => return Some(Route::AdminAudit),
        _ => {}
    }
    if let Some(name) = path.strip_prefix("/admin/robots/") {
        return (!name.is_empty() && !name.contains('/')).then_some(Route::AdminRobot { name });
    }
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    // (No repository starts with `_`: these cannot shadow one.)
    if let Some(ext) = rest.strip_prefix("_ballast/") {
        // `<name>/blobs/<digest>/recipe|chunks` first: the latter also ends in `/chunks`.
        if let Some((head, what)) = ext.rsplit_once('/') {
            if let Some((name, digest)) = head.rsplit_once('/').and_then(|(h, d)| {
                h.strip_suffix("/blobs")
                    .filter(|n| !n.is_empty() && d.contains(':'))
                    .map(|n| (n, d))
            }) {
                match what {
                    "recipe" => return Some(Route::DeltaRecipe { name, digest }),
                    "chunks" => return Some(Route::DeltaFetch { name, digest }),
                    _ => {}
                }
            }
        }
        if let Some(name) = ext.strip_suffix("/chunks/missing") {
            return Some(Route::DeltaMissing { name });
        }
        if let Some(name) = ext.strip_suffix("/chunks") {
            return Some(Route::DeltaChunks { name });
        }
        let (head, digest) = ext.rsplit_once('/')?;
        let name = head.strip_suffix("/blobs")?;
        return (!name.is_empty() && !digest.is_empty())
            .then_some(Route::DeltaBlob { name, digest });
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags { name });
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Route::UploadStart { name });
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    if name.is_empty() || last.is_empty() {
        return None;
    }
    match kind {
        "manifests" => Some(Route::Manifest {
            name,
            reference: last,
        }),
        "blobs" => Some(Route::Blob { name, digest: last }),
        "referrers" => Some(Route::Referrers { name, digest: last }),
        "uploads" => head
            .strip_suffix("/blobs/uploads")
            .map(|name| Route::Upload { name, id: last }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every endpoint that can change something is audited (or audited where its change
    /// ends), and every endpoint is in the table once.
    #[test]
    fn every_mutating_endpoint_has_an_audit_kind() {
        let mut seen = std::collections::HashSet::new();
        for d in ENDPOINTS {
            assert!(seen.insert(d.endpoint), "{:?} listed twice", d.endpoint);
            // (POST /token asks for a token and changes nothing; auth.rs audits its failed
            // logins.)
            let mutates = d
                .methods
                .iter()
                .any(|m| !matches!(*m, Method::GET | Method::HEAD))
                && d.endpoint != Endpoint::Token
                // (POSTs of chunk ids, asking which are missing or for their bytes: reads.)
                && d.endpoint != Endpoint::DeltaFetch
                && d.endpoint != Endpoint::DeltaMissing;
            match d.audit {
                Audit::Read => assert!(
                    !mutates,
                    "{:?} changes things but is not audited",
                    d.endpoint
                ),
                Audit::Change(_) => assert!(mutates, "{:?} is a read", d.endpoint),
                Audit::AtEnd(e) => assert!(
                    descriptor(e).is_some_and(
                        |end| matches!(end.audit, Audit::Change(_)) && end.path == d.path
                    ),
                    "{:?} defers to {e:?}, which audits nothing on its path",
                    d.endpoint
                ),
            }
            // Two endpoints of a path never share a method.
            for other in ENDPOINTS
                .iter()
                .filter(|o| o.path == d.path && o.endpoint != d.endpoint)
            {
                assert!(
                    !d.methods.iter().any(|m| other.methods.contains(m)),
                    "{:?} and {:?} share a method",
                    d.endpoint,
                    other.endpoint
                );
            }
        }
    }

    #[test]
    fn resolves_methods_on_paths() {
        let found = |m: Method, p: &str| match resolve(&m, p) {
            Resolved::Found(d, _) => Some(d.endpoint),
            _ => None,
        };
        assert_eq!(
            found(Method::HEAD, "/v2/a/manifests/v1"),
            Some(Endpoint::ManifestGet)
        );
        assert_eq!(
            found(Method::PUT, "/v2/a/manifests/v1"),
            Some(Endpoint::ManifestPut)
        );
        assert_eq!(
            found(Method::PATCH, "/v2/a/blobs/uploads/x"),
            Some(Endpoint::UploadPatch)
        );
        assert_eq!(found(Method::POST, "/token"), Some(Endpoint::Token));
        assert!(matches!(
            resolve(&Method::PATCH, "/v2/a/manifests/v1"),
            Resolved::MethodNotAllowed(d, _) if d.endpoint == Endpoint::ManifestGet
        ));
        assert!(matches!(resolve(&Method::GET, "/v3/x"), Resolved::NotFound));
    }

    #[test]
    fn table() {
        assert_eq!(route("/v2/"), Some(Route::Base));
        assert_eq!(route("/v2"), Some(Route::Base));
        assert_eq!(route("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(
            route("/v2/a/b/tags/list"),
            Some(Route::Tags { name: "a/b" })
        );
        assert_eq!(
            route("/v2/a/manifests/latest"),
            Some(Route::Manifest {
                name: "a",
                reference: "latest"
            })
        );
        assert_eq!(
            route("/v2/x/blobs/y/blobs/sha256:00"),
            Some(Route::Blob {
                name: "x/blobs/y",
                digest: "sha256:00"
            })
        );
        assert_eq!(
            route("/v2/a/blobs/uploads/"),
            Some(Route::UploadStart { name: "a" })
        );
        assert_eq!(
            route("/v2/a/b/blobs/uploads/abc"),
            Some(Route::Upload {
                name: "a/b",
                id: "abc"
            })
        );
        assert_eq!(
            route("/v2/a/referrers/sha256:1"),
            Some(Route::Referrers {
                name: "a",
                digest: "sha256:1"
            })
        );
        assert_eq!(route("/v2/a/uploads/x"), None);
        assert_eq!(route("/v3/a"), None);
        assert_eq!(route("/v2/a/manifests/"), None);
    }
}
