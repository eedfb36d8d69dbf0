//! The events an upload's state changes cause, as delivered to the webhook receiver.

use chrono::{DateTime, SecondsFormat};
use serde_json::json;

use super::now_ms;
use crate::repo::{NewEvent, UploadRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    /// Only once the bytes are final in the store.
    Completed,
    Terminated,
    Expired,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "upload.created",
            Self::Completed => "upload.completed",
            Self::Terminated => "upload.terminated",
            Self::Expired => "upload.expired",
        }
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An event about `upload` (as it is after the change), with where its bytes are (None for a
/// final upload, read from its partial uploads' objects) and the URL
/// it downloads from. Its id is the `webhook-id` receivers de-duplicate on.
pub fn event(kind: EventKind, upload: &UploadRow, location: Option<String>, url: String) -> NewEvent {
    let now = now_ms();
    let id = format!("evt_{}", uuid::Uuid::new_v4().simple());
    let metadata: serde_json::Map<String, serde_json::Value> = upload
        .metadata
        .decoded()
        .into_iter()
        .map(|(key, value)| (key, value.map_or(serde_json::Value::Null, serde_json::Value::String)))
        .collect();
    let completed = kind == EventKind::Completed;
    let payload = json!({
        "type": kind.as_str(),
        "timestamp": rfc3339(now),
        "data": {
            "id": upload.id.to_string(),
            "size": upload.length,
            "offset": upload.offset,
            "sha256": upload.sha256.map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            "metadata": metadata,
            "owner": upload.owner,
            "location": location,
            "url": url,
            "created_at": rfc3339(upload.created_at),
            "completed_at": completed.then(|| rfc3339(now)),
        }
    });
    NewEvent {
        id,
        upload_id: upload.id,
        event_type: kind.as_str().to_string(),
        payload: payload.to_string(),
        created_at: now,
    }
}
