//! What a webhook event says, as stored in the outbox, and the two shapes it is delivered
//! in: CloudEvents 1.0 (structured JSON) and the envelope CNCF Distribution sends. Also the
//! signature every delivery carries.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;

/// The kinds of events, as named in the config (`events = [...]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A manifest was pushed (by tag or by digest).
    #[serde(rename = "manifest.pushed")]
    ManifestPushed,
    /// A tag was set: created, or moved to another manifest (`previous` says from what).
    #[serde(rename = "tag.set")]
    TagSet,
    /// A tag was deleted.
    #[serde(rename = "tag.deleted")]
    TagDeleted,
    /// A manifest was deleted (by digest).
    #[serde(rename = "manifest.deleted")]
    ManifestDeleted,
    /// A blob upload finished (or a blob was mounted from another repository).
    #[serde(rename = "blob.uploaded")]
    BlobUploaded,
    /// A manifest was pulled (GET; off unless listed; `pull_sample` thins it out).
    #[serde(rename = "manifest.pulled")]
    ManifestPulled,
    /// A garbage collection finished.
    #[serde(rename = "gc.finished")]
    GcFinished,
    /// A namespace went past the soft percentage of its byte quota (`detail` says how far).
    #[serde(rename = "quota.warning")]
    QuotaWarning,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 8] = [
        Kind::ManifestPushed,
        Kind::TagSet,
        Kind::TagDeleted,
        Kind::ManifestDeleted,
        Kind::BlobUploaded,
        Kind::ManifestPulled,
        Kind::GcFinished,
        Kind::QuotaWarning,
    ];

    /// The name in the config and in `Ballast-Event-Type`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ManifestPushed => "manifest.pushed",
            Kind::TagSet => "tag.set",
            Kind::TagDeleted => "tag.deleted",
            Kind::ManifestDeleted => "manifest.deleted",
            Kind::BlobUploaded => "blob.uploaded",
            Kind::ManifestPulled => "manifest.pulled",
            Kind::GcFinished => "gc.finished",
            Kind::QuotaWarning => "quota.warning",
        }
    }

    /// A kind by its config name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// One event, as recorded in the outbox (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id (32 hex digits): the CloudEvents `id`, and what a receiver deduplicates on
    /// (a delivery may be repeated).
    pub id: String,
    /// What happened.
    pub kind: Kind,
    /// When, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Digest of the manifest or blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `tag.set`: the digest the tag pointed at before; `blob.uploaded` by mount: the
    /// repository it was mounted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Media type of the manifest (or `application/octet-stream` for blobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Who: `user:NAME`, `robot:NAME`, `anonymous`, `system`.
    pub actor: String,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The request that caused it (`X-Request-Id`, the request log, the audit line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Kind-specific details (a collection's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

impl Event {
    /// A new event now.
    pub fn new(kind: Kind, actor: impl Into<String>) -> Event {
        Event {
            id: format!("{:032x}", rand::random::<u128>()),
            kind,
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            repository: None,
            tag: None,
            digest: None,
            previous: None,
            media_type: None,
            size: None,
            actor: actor.into(),
            client: None,
            request_id: None,
            detail: None,
        }
    }

    /// The action Distribution's envelope names this event by, if it has one.
    pub fn distribution_action(&self) -> Option<&'static str> {
        Some(match self.kind {
            Kind::ManifestPushed => "push",
            Kind::BlobUploaded if self.previous.is_some() => "mount",
            Kind::BlobUploaded => "push",
            Kind::ManifestPulled => "pull",
            Kind::ManifestDeleted | Kind::TagDeleted => "delete",
            Kind::TagSet | Kind::GcFinished | Kind::QuotaWarning => return None,
        })
    }

    /// An event about what an audit line records (same actor, client, repository, digest,
    /// tag, request and time).
    pub fn of_audit(kind: Kind, line: &crate::audit::Event) -> Event {
        let mut e = Event::new(kind, line.actor.clone());
        e.time = line.time.clone();
        e.client = line.client.clone();
        e.repository = line.repository.clone();
        e.digest = line.digest.clone();
        e.tag = line.tag.clone();
        e.request_id = line.request_id.clone();
        e
    }

    /// The CloudEvents 1.0 structured form (`application/cloudevents+json`).
    pub fn cloudevent(&self, source: &str) -> Value {
        let subject = match (&self.repository, &self.tag, &self.digest) {
            (Some(r), Some(t), _) => Some(format!("{r}:{t}")),
            (Some(r), None, Some(d)) => Some(format!("{r}@{d}")),
            (Some(r), None, None) => Some(r.clone()),
            _ => None,
        };
        let mut data = json!({
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "mediaType": self.media_type,
            "size": self.size,
            "actor": self.actor,
            "clientAddress": self.client,
            "requestId": self.request_id,
            "time": self.time,
        });
        if let Some(p) = &self.previous {
            let key = if self.kind == Kind::BlobUploaded {
                "mountedFrom"
            } else {
                "previousDigest"
            };
            data[key] = json!(p);
        }
        if let Some(d) = &self.detail {
            data["detail"] = d.clone();
        }
        if let Value::Object(m) = &mut data {
            m.retain(|_, v| !v.is_null());
        }
        let mut ce = json!({
            "specversion": "1.0",
            "id": self.id,
            "source": source,
            "type": format!("dev.ballast.{}", self.kind.name()),
            "time": self.time,
            "datacontenttype": "application/json",
            "data": data,
        });
        if let Some(s) = subject {
            ce["subject"] = json!(s);
        }
        ce
    }

    /// The event as CNCF Distribution sends it (one element of its envelope's `events`), or
    /// `None` for kinds Distribution has no action for (`tag.set`, `gc.finished`): a
    /// receiver written for Distribution sees a tag set in the `tag` of a push.
    pub fn distribution(&self, source_addr: &str, base_url: &str) -> Option<Value> {
        let action = self.distribution_action()?;
        let repo = self.repository.clone().unwrap_or_default();
        let mut target = json!({
            "repository": repo,
        });
        if let Some(d) = &self.digest {
            target["digest"] = json!(d);
            let kind = if self.kind == Kind::BlobUploaded {
                "blobs"
            } else {
                "manifests"
            };
            target["url"] = json!(format!("{base_url}/v2/{repo}/{kind}/{d}"));
        }
        if let Some(m) = &self.media_type {
            target["mediaType"] = json!(m);
        }
        if let Some(n) = self.size {
            target["size"] = json!(n);
            target["length"] = json!(n);
        }
        if let Some(t) = &self.tag {
            target["tag"] = json!(t);
        }
        if self.kind == Kind::BlobUploaded {
            if let Some(from) = &self.previous {
                target["fromRepository"] = json!(from);
            }
        }
        Some(json!({
            "id": self.id,
            "timestamp": self.time,
            "action": action,
            "target": target,
            "request": {
                "id": self.request_id.clone().unwrap_or_default(),
                "addr": self.client.clone().unwrap_or_default(),
                "host": source_addr,
                "method": match self.kind {
                    Kind::ManifestPulled => "GET",
                    Kind::ManifestDeleted | Kind::TagDeleted => "DELETE",
                    Kind::BlobUploaded => "PUT",
                    _ => "PUT",
                },
                "useragent": "",
            },
            "actor": {"name": self.actor},
            "source": {"addr": source_addr, "instanceID": ""},
        }))
    }
}

/// The signature header's value: `v1=` and the hex HMAC-SHA256, keyed by the endpoint's
/// secret, of `<timestamp>.<body>` (the timestamp as sent in `Ballast-Timestamp`).
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // (HMAC takes a key of any length.)
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
            let json = serde_json::to_string(&k).expect("json");
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(Kind::parse("push"), None);
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2: key "Jefe", message "what do ya want for nothing?", split
        // as the scheme joins timestamp and body (so the known answer checks the HMAC).
        assert_eq!(
            sign(b"Jefe", 0, b"what do ya want for nothing?")[..3],
            *"v1="
        );
        let mut rfc = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("key");
        rfc.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(rfc.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("key");
        mac.update(b"1700000000.{\"a\":1}");
        let want = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sign(b"Jefe", 1_700_000_000, b"{\"a\":1}"), want);
        assert_ne!(sign(b"other", 1_700_000_000, b"{\"a\":1}"), want);
        assert_ne!(sign(b"Jefe", 1_700_000_001, b"{\"a\":1}"), want);
    }

    #[test]
    fn cloudevent_and_distribution_shapes() {
        let mut e = Event::new(Kind::ManifestPushed, "user:alice");
        e.repository = Some("team/app".into());
        e.tag = Some("v1".into());
        e.digest = Some("sha256:ab".into());
        e.media_type = Some("application/vnd.oci.image.manifest.v1+json".into());
        e.size = Some(512);
        let ce = e.cloudevent("/ballast");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "dev.ballast.manifest.pushed");
        assert_eq!(ce["subject"], "team/app:v1");
        assert_eq!(ce["data"]["size"], 512);
        assert!(ce["data"].get("previousDigest").is_none());
        let d = e.distribution("reg:5000", "http://reg:5000").expect("push");
        assert_eq!(d["action"], "push");
        assert_eq!(d["target"]["length"], 512);
        assert_eq!(d["target"]["tag"], "v1");
        assert_eq!(
            d["target"]["url"],
            "http://reg:5000/v2/team/app/manifests/sha256:ab"
        );
        assert_eq!(d["actor"]["name"], "user:alice");
        let gc = Event::new(Kind::GcFinished, "system");
        assert!(gc.distribution("a", "b").is_none());
    }
}
