//! Search on OpenSearch or Elasticsearch 8+ (the Elasticsearch API, through the `elasticsearch`
//! crate). Index template `{prefix}messages` gives every index `{prefix}messages-*` the
//! `message_text` analyzer (Unicode words, lowercased, ASCII-folded, Porter stems: what the
//! embedded FTS5 tokenizer does) and the mapping; the live index is reached through the alias
//! `{prefix}messages`, so that a rebuild can fill another index and move the alias.
//!
//! Each changed document is written whole by one `index` op of a `_bulk` with
//! `version_type=external` and version `applied`: the server refuses a stale or repeated one
//! (a 409 for that item: already there). The progress is one more document of the same index,
//! `_id` `progress` (no message has that id, and it has no `workspace_id`, so no search finds
//! it), written after the effects with `if_seq_no`/`if_primary_term`: of two members applying
//! the same batch, one is refused.
//!
//! Searches see writes only after the index's next refresh (every 200 ms). Nothing waits for
//! it: the index has one shard, in which a refresh makes everything written before it visible
//! at once, so the progress document as of the last refresh (a GET with `realtime=false`) is
//! a progress whose effects every search sees: [`Projector::visible`]. The writers read the
//! latest one (a real-time GET).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use elasticsearch::http::request::JsonBody;
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{StatusCode, Url};
use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteIndexTemplateParts, IndicesDeleteParts, IndicesPutIndexTemplateParts,
};
use elasticsearch::{BulkParts, Elasticsearch, GetParts, IndexParts, MgetParts, SearchParts};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Document, Hit, Hits, MARK_END, MARK_START, Query, Search, fold, highlight, to_read};
use crate::timelines::MessageView;
use crate::{Batch, Progress, ProjectionError, Projector, Stored, check_moves, parse_partition_key, partition_key};

/// The `_id` of the progress document in the messages index.
const PROGRESS: &str = "progress";

pub struct OpenSearch {
    client: Elasticsearch,
    prefix: String,
}

fn unavailable(error: impl ToString) -> ProjectionError {
    ProjectionError::Unavailable(error.to_string())
}

/// The stored progress and the sequence number and primary term it was read at.
struct Versioned {
    stored: Stored,
    seq_no: i64,
    primary_term: i64,
}

impl OpenSearch {
    /// A client of the server at `url`; its indexes are named from `prefix` (`quikapp-`).
    pub fn connect(url: &str, prefix: &str) -> Result<Self, ProjectionError> {
        let url = Url::parse(url).map_err(unavailable)?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .enable_meta_header(false)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(unavailable)?;
        Ok(OpenSearch { client: Elasticsearch::new(transport), prefix: prefix.to_owned() })
    }

    /// The alias searches and writes go through.
    pub fn messages(&self) -> String {
        format!("{}messages", self.prefix)
    }

    /// The template, the first messages index behind its alias, and its progress document,
    /// each when missing.
    pub async fn migrate(&self) -> Result<(), ProjectionError> {
        let template = json!({
            "index_patterns": [format!("{}-*", self.messages())],
            "template": {
                "settings": {
                    // One shard: a refresh then shows every earlier write at once (see the module).
                    "number_of_shards": 1,
                    "refresh_interval": "200ms",
                    "auto_expand_replicas": "0-1",
                    "analysis": { "analyzer": { "message_text": {
                        "type": "custom", "tokenizer": "standard", "filter": ["lowercase", "asciifolding", "porter_stem"]
                    } } }
                },
                "mappings": {
                    "dynamic": false,
                    "properties": {
                        "workspace_id": { "type": "keyword" },
                        "channel_id": { "type": "keyword" },
                        "author_id": { "type": "keyword" },
                        "text": { "type": "text", "analyzer": "message_text" },
                        "deleted": { "type": "boolean" },
                        "position": { "type": "long" },
                        "applied": { "type": "long" },
                        "message": { "type": "object", "enabled": false }
                    }
                }
            }
        });
        let (indices, messages) = (self.client.indices(), self.messages());
        let put = indices.put_index_template(IndicesPutIndexTemplateParts::Name(&messages)).body(template);
        expect_success(put.send().await, &[]).await?;
        let first = format!("{messages}-1");
        let aliased = json!({ "aliases": { &messages: {} } });
        let create = indices.create(IndicesCreateParts::Index(&first)).body(aliased);
        expect_success(create.send().await, &["resource_already_exists_exception"]).await?;
        let empty = json!({ "partitions": [], "dead_lettered": 0 });
        let initial = self.client.create(elasticsearch::CreateParts::IndexId(&messages, PROGRESS)).body(empty);
        expect_success(initial.send().await, &["version_conflict_engine_exception"]).await?;
        Ok(())
    }

    /// Deletes this model's indexes and template: for tests.
    pub async fn delete(&self) -> Result<(), ProjectionError> {
        let (indices, pattern, messages) = (self.client.indices(), format!("{}*", self.prefix), self.messages());
        let indexes = [pattern.as_str()];
        let delete = indices.delete(IndicesDeleteParts::Index(&indexes));
        expect_success(delete.send().await, &[]).await?;
        let template = indices.delete_index_template(IndicesDeleteIndexTemplateParts::Name(&messages));
        expect_success(template.send().await, &[]).await.map(|_| ())
    }

    pub async fn ping(&self) -> Result<(), ProjectionError> {
        self.latest().await.map(|_| ())
    }

    /// The latest progress document, which `migrate` creates.
    async fn latest(&self) -> Result<Versioned, ProjectionError> {
        let missing = || ProjectionError::Unavailable(format!("no progress in {}: migrate first", self.messages()));
        self.versioned(true).await?.ok_or_else(missing)
    }

    /// Makes every write so far visible to searches now: for tests, which read the model right
    /// after writing it.
    pub async fn refresh(&self) -> Result<(), ProjectionError> {
        let messages = self.messages();
        let indexes = [messages.as_str()];
        let indices = self.client.indices();
        let refresh = indices.refresh(elasticsearch::indices::IndicesRefreshParts::Index(&indexes));
        expect_success(refresh.send().await, &[]).await.map(|_| ())
    }

    /// The progress document: the latest (`realtime`), or as of the last refresh; `None` when
    /// there is none (before the first refresh after `migrate`, when not real-time).
    async fn versioned(&self, realtime: bool) -> Result<Option<Versioned>, ProjectionError> {
        let messages = self.messages();
        let response = self.client.get(GetParts::IndexId(&messages, PROGRESS)).realtime(realtime).send().await;
        let body = expect_success(response, &[]).await?;
        if body["found"] == false {
            return Ok(None);
        }
        let source = &body["_source"];
        let partitions = source["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let partition = parse_partition_key(p["partition"].as_str()?)?;
                Some((partition, Progress { offset: p["offset"].as_u64()?, watermark: p["watermark"].as_u64()? }))
            })
            .collect();
        let stored = Stored { partitions, dead_lettered: source["dead_lettered"].as_u64().unwrap_or(0) };
        let number = |key: &str| body[key].as_i64().ok_or_else(|| unavailable(format!("no {key} in {body}")));
        Ok(Some(Versioned { stored, seq_no: number("_seq_no")?, primary_term: number("_primary_term")? }))
    }

    /// The stored documents among `ids`.
    async fn documents(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Document>, ProjectionError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let messages = self.messages();
        let request = self.client.mget(MgetParts::Index(&messages)).body(json!({ "ids": ids }));
        let body = expect_success(request.send().await, &[]).await?;
        let found = body["docs"].as_array().into_iter().flatten().filter(|d| d["found"] == true);
        found
            .map(|d| {
                let document = document_of(&d["_source"]).ok_or_else(|| unavailable(format!("unreadable: {d}")))?;
                Ok((document.message.message_id, document))
            })
            .collect()
    }

    /// Writes each document unless the stored one is as recent.
    async fn write(&self, documents: Vec<&Document>) -> Result<(), ProjectionError> {
        let mut body: Vec<JsonBody<Value>> = Vec::with_capacity(documents.len() * 2);
        for document in documents {
            let message = &document.message;
            body.push(
                json!({ "index": {
                "_id": message.message_id, "version": document.applied, "version_type": "external"
            } })
                .into(),
            );
            body.push(source(document).into());
        }
        let messages = self.messages();
        let bulk = self.client.bulk(BulkParts::Index(&messages)).body(body);
        let answer = expect_success(bulk.send().await, &[]).await?;
        if answer["errors"] != true {
            return Ok(());
        }
        for item in answer["items"].as_array().into_iter().flatten() {
            let result = &item["index"];
            match result["status"].as_u64().unwrap_or(0) {
                200..=299 | 409 => {} // 409: this version or a later one is there
                429 | 500.. => return Err(unavailable(&result["error"])),
                _ => return Err(ProjectionError::Rejected(result["error"].to_string())),
            }
        }
        Ok(())
    }

    /// Stores `stored` unless the progress document changed since `read`.
    async fn save(&self, read: &Versioned, stored: &Stored) -> Result<(), ProjectionError> {
        let partitions: Vec<Value> = stored
            .partitions
            .iter()
            .map(|(p, at)| json!({ "partition": partition_key(p), "offset": at.offset, "watermark": at.watermark }))
            .collect();
        let messages = self.messages();
        let save = self
            .client
            .index(IndexParts::IndexId(&messages, PROGRESS))
            .if_seq_no(read.seq_no)
            .if_primary_term(read.primary_term)
            .body(json!({ "partitions": partitions, "dead_lettered": stored.dead_lettered }));
        match save.send().await {
            Ok(response) if response.status_code() == StatusCode::CONFLICT => {
                Err(ProjectionError::Moved("another member stored this progress first".into()))
            }
            response => expect_success(response, &[]).await.map(|_| ()),
        }
    }
}

/// The body of a successful answer; an error whose type is among `tolerated` counts as one.
async fn expect_success(
    response: Result<Response, elasticsearch::Error>,
    tolerated: &[&str],
) -> Result<Value, ProjectionError> {
    let response = response.map_err(unavailable)?;
    let status = response.status_code();
    let body: Value = response.json().await.map_err(unavailable)?;
    // A GET that finds no document answers 404 with `found: false`: an answer all the same.
    let answered = status.is_success() || body["found"] == false;
    if answered || body["error"]["type"].as_str().is_some_and(|t| tolerated.contains(&t)) {
        return Ok(body);
    }
    let error = format!("{status}: {}", body["error"]);
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() || status == StatusCode::NOT_FOUND {
        Err(ProjectionError::Unavailable(error))
    } else {
        Err(ProjectionError::Rejected(error))
    }
}

/// A document as indexed: the fields searches match and filter on, and the message whole.
pub fn source(document: &Document) -> Value {
    let message = &document.message;
    json!({
        "workspace_id": document.workspace_id,
        "channel_id": message.channel_id,
        "author_id": message.author_id,
        "text": message.text,
        "deleted": message.deleted,
        "position": message.position,
        "applied": document.applied,
        "message": message,
    })
}

fn document_of(source: &Value) -> Option<Document> {
    Some(Document {
        workspace_id: serde_json::from_value(source["workspace_id"].clone()).ok()?,
        applied: source["applied"].as_u64()?,
        message: serde_json::from_value(source["message"].clone()).ok()?,
    })
}

#[async_trait]
impl Projector for OpenSearch {
    fn name(&self) -> &'static str {
        "search"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        Ok(self.latest().await?.stored)
    }

    /// The progress as of the last refresh (see the module).
    async fn visible(&self) -> Result<Stored, ProjectionError> {
        Ok(self.versioned(false).await?.map(|v| v.stored).unwrap_or_default())
    }

    /// Not atomic (see the module): a batch whose progress moved is refused before any write;
    /// otherwise its documents, each versioned, then its progress in one compare-and-set.
    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        let read = self.latest().await?;
        check_moves(&batch.moves, |p| read.stored.partitions.get(p).map(|s| s.offset))?;
        let mut documents = self.documents(&to_read(&batch.events)).await?;
        let changed = fold(&batch.events, &mut documents);
        if !changed.is_empty() {
            self.write(changed.iter().map(|id| &documents[id]).collect()).await?;
        }
        let mut stored = read.stored.clone();
        stored.record(&batch.moves, batch.dead_lettered);
        self.save(&read, &stored).await
    }

    /// OpenSearch tells no one of writes: the progress is looked at again every 100 ms.
    async fn changed(&self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[async_trait]
impl Search for OpenSearch {
    async fn search(&self, query: &Query) -> Result<Hits, ProjectionError> {
        let mut filter =
            vec![json!({ "term": { "workspace_id": query.workspace_id } }), json!({ "term": { "deleted": false } })];
        if let Some(channel) = query.channel {
            filter.push(json!({ "term": { "channel_id": channel } }));
        }
        if let Some(author) = query.author {
            filter.push(json!({ "term": { "author_id": author } }));
        }
        let request = json!({
            "size": query.limit,
            "track_total_hits": true,
            "query": { "bool": {
                "must": [{ "match": { "text": { "query": query.words.join(" "), "operator": "and" } } }],
                "filter": filter,
                "must_not": [{ "terms": { "channel_id": query.hidden } }],
            } },
            "sort": [{ "_score": "desc" }, { "position": "desc" }],
            "_source": ["workspace_id", "applied", "message"],
            "highlight": {
                "pre_tags": [MARK_START.to_string()],
                "post_tags": [MARK_END.to_string()],
                "fields": { "text": { "number_of_fragments": 0 } },
            },
        });
        let messages = self.messages();
        let indexes = [messages.as_str()];
        let search = self.client.search(SearchParts::Index(&indexes)).body(request);
        let answer = expect_success(search.send().await, &[]).await.map_err(unavailable)?;
        let hits = answer["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|hit| {
                let document = document_of(&hit["_source"])?;
                let marked = hit["highlight"]["text"][0].as_str().unwrap_or(&document.message.text);
                Some(Hit { highlight: highlight(marked), message: MessageView::from(&document.message) })
            })
            .collect();
        let total = answer["hits"]["total"]["value"].as_u64().unwrap_or(0);
        Ok(Hits { hits, total })
    }
}
