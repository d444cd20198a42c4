//! Search on OpenSearch or Elasticsearch 8+ (the Elasticsearch API, through the `elasticsearch`
//! crate). Index template `{prefix}messages` gives every index `{prefix}messages-*` the
//! `message_text` analyzer (Unicode words, lowercased, ASCII-folded, Porter stems: what the
//! embedded FTS5 tokenizer does) and the mapping (the first index is created with them too, so
//! no other template can change them); the live index is reached through the alias
//! `{prefix}messages`, so that a rebuild can fill another index and move the alias.
//!
//! Each changed document is written whole by one `index` op of a `_bulk` with
//! `version_type=external` and version `applied`: the server refuses a stale or repeated one
//! (a 409 for that item: already there). Beside the messages, the index holds one document per
//! channel (`_id` `channel:{id}`, whether it is private, written once) and the progress
//! (`_id` `progress`); neither has a `workspace_id`, so no search finds them. Each bulk waits
//! for the refresh that makes it searchable (`refresh=wait_for`, on every copy of every shard;
//! the index refreshes every 50 ms; a batch applied again, whose effects an earlier attempt
//! wrote, refreshes explicitly), and only then is the progress written, with
//! `if_seq_no`/`if_primary_term`: what the progress says is applied, searches see; and of two
//! members applying the same batch, one is refused. Members of one group applying different
//! partitions at once each merge their moves into the progress the other left.
//!
//! One window is left open, with replicas only: when an attempt stops after its bulk reached
//! the primary but before that bulk reached a replica, the retry's explicit refresh may run on
//! the replica first, and a search served there can miss those documents until the next
//! refresh (50 ms) although the progress says they are applied. Rewriting them with
//! `external_gte` would close it but lets a stale member overwrite a document at an equal
//! version with other content (a reply set replayed against a later state).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{StatusCode, Url};
use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteIndexTemplateParts, IndicesDeleteParts, IndicesExistsAliasParts,
    IndicesGetAliasParts, IndicesGetMappingParts, IndicesPutIndexTemplateParts,
};
use elasticsearch::params::Refresh;
use elasticsearch::{BulkParts, Elasticsearch, GetParts, IndexParts, MgetParts, SearchParts};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Document, Hit, Hits, Known, MARK_END, MARK_START, Query, Search, fold, highlight, to_read};
use crate::audit::{Model, SearchContents};
use crate::timelines::MessageView;
use crate::{Batch, Progress, ProjectionError, Projector, Stored, check_moves, parse_partition_key, partition_key};

/// The `_id` of the progress document in the messages index.
const PROGRESS: &str = "progress";
/// A bulk request is sent once its body reaches this size (the server's limit is 100 MB).
const BULK_BYTES: usize = 16 << 20;
/// Per-item bulk errors that are the document's own fault: a retry cannot cure them.
const DOCUMENT_ERRORS: &[&str] = &["mapper_parsing_exception", "document_parsing_exception"];

pub struct OpenSearch {
    client: Elasticsearch,
    prefix: String,
    /// A rebuild's own index, written directly; `None`: the live one, through the alias.
    rebuild: Option<String>,
    /// Whether each channel met is private: a channel never changes that, so what was read or
    /// written once is kept (up to a million channels) instead of read again for every batch.
    channels: moka::sync::Cache<Uuid, bool>,
}

fn unavailable(error: impl ToString) -> ProjectionError {
    ProjectionError::Unavailable(error.to_string())
}

fn channel_id(channel: Uuid) -> String {
    format!("channel:{channel}")
}

/// The stored progress and the sequence number and primary term it was read at.
struct Versioned {
    stored: Stored,
    /// Until when (milliseconds since the epoch) a replay has paused the model, if it has.
    paused_until: Option<i64>,
    seq_no: i64,
    primary_term: i64,
}

impl Versioned {
    /// Refuses to store anything while a replay has the model paused.
    fn unless_paused(self) -> Result<Self, ProjectionError> {
        match self.paused_until {
            Some(until) if until > chrono::Utc::now().timestamp_millis() => {
                Err(unavailable("the model is paused for a replay to swap in its rebuild"))
            }
            _ => Ok(self),
        }
    }

    /// The progress document's source.
    fn source(&self, paused_until: Option<i64>) -> Value {
        let partitions: Vec<Value> = self
            .stored
            .partitions
            .iter()
            .map(|(p, at)| json!({ "partition": partition_key(p), "offset": at.offset, "watermark": at.watermark }))
            .collect();
        json!({ "partitions": partitions, "dead_lettered": self.stored.dead_lettered, "paused_until": paused_until })
    }
}

/// The version of the index's mappings this build writes and reads, in the mappings' `_meta`
/// (an index without one is of version 1); an index of an older one is rebuilt by
/// `quikapp replay search`.
pub const SCHEMA_VERSION: u64 = 1;

impl OpenSearch {
    /// A client of the server at `url`; its indexes are named from `prefix` (`quikapp-`).
    pub fn connect(url: &str, prefix: &str) -> Result<Self, ProjectionError> {
        let url = Url::parse(url).map_err(unavailable)?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .enable_meta_header(false)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(unavailable)?;
        let channels = moka::sync::Cache::new(1_000_000);
        Ok(OpenSearch { client: Elasticsearch::new(transport), prefix: prefix.to_owned(), rebuild: None, channels })
    }

    /// The model in index `index` (a rebuild beside the live one), on the server of `self`.
    fn in_index(&self, index: String) -> Self {
        let channels = moka::sync::Cache::new(1_000_000);
        OpenSearch { client: self.client.clone(), prefix: self.prefix.clone(), rebuild: Some(index), channels }
    }

    /// The alias searches and writes of the live model go through.
    pub fn messages(&self) -> String {
        format!("{}messages", self.prefix)
    }

    /// Where this model's reads and writes go: the alias, or a rebuild's index.
    fn target(&self) -> String {
        self.rebuild.clone().unwrap_or_else(|| self.messages())
    }

    /// The index behind the alias.
    async fn live_index(&self) -> Result<String, ProjectionError> {
        let alias = self.messages();
        let (indices, names) = (self.client.indices(), [alias.as_str()]);
        let answer = expect_success(indices.get_alias(IndicesGetAliasParts::Name(&names)).send().await, &[]).await?;
        let indexes: Vec<&String> = answer.as_object().into_iter().flat_map(|o| o.keys()).collect();
        match indexes.as_slice() {
            [index] => Ok((*index).clone()),
            _ => Err(unavailable(format!("the alias {alias} is on {indexes:?}, not on one index"))),
        }
    }

    /// The template, the first messages index behind its alias, and its progress document,
    /// each when missing.
    pub async fn migrate(&self) -> Result<(), ProjectionError> {
        let (indices, messages) = (self.client.indices(), self.messages());
        let index = json!({
            "settings": {
                "refresh_interval": "50ms",
                "auto_expand_replicas": "0-1",
                "analysis": { "analyzer": { "message_text": {
                    "type": "custom", "tokenizer": "standard", "filter": ["lowercase", "asciifolding", "porter_stem"]
                } } }
            },
            "mappings": {
                "_meta": { "schema_version": SCHEMA_VERSION },
                "dynamic": false,
                "properties": {
                    "workspace_id": { "type": "keyword" },
                    "channel_id": { "type": "keyword" },
                    "author_id": { "type": "keyword" },
                    "text": { "type": "text", "analyzer": "message_text" },
                    "deleted": { "type": "boolean" },
                    "private": { "type": "boolean" },
                    "position": { "type": "long" },
                    "applied": { "type": "long" },
                    "message": { "type": "object", "enabled": false },
                    "channel_private": { "type": "boolean", "index": false }
                }
            }
        });
        let template = json!({ "index_patterns": [format!("{messages}-*")], "template": index });
        let put = indices.put_index_template(IndicesPutIndexTemplateParts::Name(&messages)).body(template);
        expect_success(put.send().await, &[]).await?;
        // The first index, unless the alias is already on one (a replay moves it on).
        let aliases = [messages.as_str()];
        let alias_exists = indices.exists_alias(IndicesExistsAliasParts::Name(&aliases)).send().await;
        let alias_exists = alias_exists.map_err(unavailable)?.status_code().is_success();
        let (name, mut create) = match &self.rebuild {
            Some(rebuild) => (Some(rebuild.clone()), index),
            None => ((!alias_exists).then(|| format!("{messages}-1")), index),
        };
        if let Some(name) = name {
            if self.rebuild.is_none() {
                create["aliases"] = json!({ &messages: { "is_write_index": true } });
            }
            let create = indices.create(IndicesCreateParts::Index(&name)).body(create);
            expect_success(create.send().await, &["resource_already_exists_exception"]).await?;
        }
        let target = self.target();
        let empty = json!({ "partitions": [], "dead_lettered": 0 });
        let initial = self.client.create(elasticsearch::CreateParts::IndexId(&target, PROGRESS)).body(empty);
        expect_success(initial.send().await, &["version_conflict_engine_exception"]).await?;
        Ok(())
    }

    async fn schema_version(&self) -> Result<u64, ProjectionError> {
        let (indices, target) = (self.client.indices(), self.target());
        let names = [target.as_str()];
        let answer =
            expect_success(indices.get_mapping(IndicesGetMappingParts::Index(&names)).send().await, &[]).await?;
        let versions = answer.as_object().into_iter().flat_map(|indexes| indexes.values());
        Ok(versions.map(|i| i["mappings"]["_meta"]["schema_version"].as_u64().unwrap_or(1)).min().unwrap_or(1))
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
        self.versioned().await.map(|_| ())
    }

    async fn versioned(&self) -> Result<Versioned, ProjectionError> {
        let messages = self.target();
        let body = expect_success(self.client.get(GetParts::IndexId(&messages, PROGRESS)).send().await, &[]).await?;
        if body["found"] != true {
            return Err(unavailable(format!("no progress in {messages}: run `quikapp migrate`")));
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
        Ok(Versioned {
            stored,
            paused_until: source["paused_until"].as_i64(),
            seq_no: number("_seq_no")?,
            primary_term: number("_primary_term")?,
        })
    }

    /// The stored documents and channels that `batch` needs.
    async fn known(&self, batch: &Batch) -> Result<Known, ProjectionError> {
        let reads = to_read(&batch.events);
        let mut known = Known::default();
        let mut unknown = Vec::new();
        for channel in reads.channels {
            match self.channels.get(&channel) {
                Some(private) => drop(known.channels.insert(channel, private)),
                None => unknown.push(channel),
            }
        }
        if reads.messages.is_empty() && unknown.is_empty() {
            return Ok(known);
        }
        let ids: Vec<String> =
            reads.messages.iter().map(Uuid::to_string).chain(unknown.iter().map(|c| channel_id(*c))).collect();
        let messages = self.target();
        let request = self.client.mget(MgetParts::Index(&messages)).body(json!({ "ids": ids }));
        let body = expect_success(request.send().await, &[]).await?;
        let docs = body["docs"].as_array().into_iter().flatten();
        // An item with an error (its shard unavailable) is not an absent document.
        if let Some(failed) = docs.clone().find(|d| !d["error"].is_null()) {
            return Err(unavailable(format!("reading {}: {}", failed["_id"], failed["error"])));
        }
        for found in docs.filter(|d| d["found"] == true) {
            let source = &found["_source"];
            let unreadable = || unavailable(format!("unreadable: {found}"));
            match found["_id"].as_str().and_then(|id| id.strip_prefix("channel:")) {
                Some(channel) => {
                    let channel = channel.parse().map_err(|_| unreadable())?;
                    let private = source["channel_private"].as_bool().ok_or_else(unreadable)?;
                    self.channels.insert(channel, private);
                    known.channels.insert(channel, private);
                }
                None => {
                    let document = document_of(source).ok_or_else(unreadable)?;
                    known.documents.insert(document.message.message_id, document);
                }
            }
        }
        Ok(known)
    }

    /// Sends `ops` (action and source lines) in bulks of at most about [`BULK_BYTES`], each
    /// waiting for the refresh that makes it searchable. True when some op found its document
    /// there already (a 409).
    async fn write(&self, ops: Vec<(Value, Value)>) -> Result<bool, ProjectionError> {
        let mut there = false;
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            // Each line serialized once, and counted as it is.
            let (mut body, mut bytes) = (Vec::<String>::new(), 0);
            while bytes < BULK_BYTES
                && let Some((action, source)) = ops.next()
            {
                for line in [action.to_string(), source.to_string()] {
                    bytes += line.len() + 1;
                    body.push(line);
                }
            }
            let messages = self.target();
            // The alias (or the rebuild's index), never an index the request would create.
            let bulk = self.client.bulk(BulkParts::Index(&messages)).require_alias(self.rebuild.is_none());
            let bulk = bulk.refresh(Refresh::WaitFor).body(body);
            let answer = expect_success(bulk.send().await, &[]).await?;
            if answer["errors"] != true {
                continue;
            }
            for item in answer["items"].as_array().into_iter().flatten() {
                let result = &item["index"];
                let error = &result["error"];
                match result["status"].as_u64().unwrap_or(0) {
                    200..=299 => {}
                    409 => there = true, // this version or a later one is there
                    _ if error["type"].as_str().is_some_and(|t| DOCUMENT_ERRORS.contains(&t)) => {
                        return Err(ProjectionError::Rejected(error.to_string()));
                    }
                    _ => return Err(unavailable(error)),
                }
            }
        }
        Ok(there)
    }

    /// Makes every write so far searchable now.
    async fn refresh(&self) -> Result<(), ProjectionError> {
        let messages = self.target();
        let indexes = [messages.as_str()];
        let indices = self.client.indices();
        let refresh = indices.refresh(elasticsearch::indices::IndicesRefreshParts::Index(&indexes));
        let answer = expect_success(refresh.send().await, &[]).await?;
        match answer["_shards"]["failed"].as_u64() {
            Some(0) => Ok(()),
            _ => Err(unavailable(format!("refresh failed on some shards: {}", answer["_shards"]))),
        }
    }

    /// Stores the batch's moves into the progress read as `read`. When another member stored
    /// progress meanwhile (its own partitions), the moves are checked against that and merged
    /// into it; `Moved` when they no longer apply.
    async fn save(&self, mut read: Versioned, batch: &Batch) -> Result<(), ProjectionError> {
        loop {
            let mut next = Versioned { stored: read.stored.clone(), ..read };
            next.stored.record(&batch.moves, batch.dead_lettered);
            match self.store_progress(&next, None).await? {
                true => return Ok(()),
                false => {
                    read = self.versioned().await?.unless_paused()?;
                    check_moves(&batch.moves, |p| read.stored.partitions.get(p).map(|s| s.offset))?;
                }
            }
        }
    }

    /// Stores `progress` (paused until `paused_until`) if the document is still at the
    /// sequence number it was read at; false if it is not.
    async fn store_progress(&self, progress: &Versioned, paused_until: Option<i64>) -> Result<bool, ProjectionError> {
        let messages = self.target();
        let save = self
            .client
            .index(IndexParts::IndexId(&messages, PROGRESS))
            .require_alias(self.rebuild.is_none())
            .if_seq_no(progress.seq_no)
            .if_primary_term(progress.primary_term)
            .body(progress.source(paused_until));
        match save.send().await {
            Ok(response) if response.status_code() == StatusCode::CONFLICT => Ok(false),
            response => expect_success(response, &[]).await.map(|_| true),
        }
    }

    /// Pauses the live model until `until` (milliseconds since the epoch), or ends the pause.
    async fn set_pause(&self, until: Option<i64>) -> Result<(), ProjectionError> {
        loop {
            let read = self.versioned().await?;
            if self.store_progress(&read, until).await? {
                return Ok(());
            }
        }
    }
}

/// The body of a successful answer (a GET that finds nothing is one: 404 with `found: false`);
/// an error whose type is among `tolerated` counts as one. Any other error is the store's or
/// the request's, never an event's: [`ProjectionError::Unavailable`], retried until it clears.
async fn expect_success(
    response: Result<Response, elasticsearch::Error>,
    tolerated: &[&str],
) -> Result<Value, ProjectionError> {
    let response = response.map_err(unavailable)?;
    let status = response.status_code();
    let body: Value = response.json().await.map_err(unavailable)?;
    let answered = status.is_success() || body["found"] == false;
    if answered || body["error"]["type"].as_str().is_some_and(|t| tolerated.contains(&t)) {
        return Ok(body);
    }
    Err(unavailable(format!("{status}: {}", body["error"])))
}

/// A document as indexed: the fields searches match and filter on, and the rest of the
/// message (its text is the `text` field's).
pub fn source(document: &Document) -> Value {
    let message = &document.message;
    let mut whole = serde_json::to_value(message).expect("a message serializes");
    whole.as_object_mut().expect("an object").remove("text");
    json!({
        "workspace_id": document.workspace_id,
        "channel_id": message.channel_id,
        "author_id": message.author_id,
        "text": message.text,
        "deleted": message.deleted,
        "private": document.private,
        "position": message.position,
        "applied": document.applied,
        "message": whole,
    })
}

fn document_of(source: &Value) -> Option<Document> {
    let mut message = source["message"].clone();
    message.as_object_mut()?.insert("text".into(), source["text"].clone());
    Some(Document {
        workspace_id: serde_json::from_value(source["workspace_id"].clone()).ok()?,
        private: source["private"].as_bool()?,
        applied: source["applied"].as_u64()?,
        message: serde_json::from_value(message).ok()?,
    })
}

/// The `_search` body of `query`.
pub fn query_body(query: &Query) -> Value {
    let mut filter = vec![
        json!({ "term": { "workspace_id": query.workspace_id } }),
        json!({ "term": { "deleted": false } }),
        // Public channels', and those of the private channels the caller is in.
        json!({ "bool": { "should": [
            { "term": { "private": false } },
            { "terms": { "channel_id": query.private } },
        ] } }),
    ];
    if let Some(channel) = query.channel {
        filter.push(json!({ "term": { "channel_id": channel } }));
    }
    if let Some(author) = query.author {
        filter.push(json!({ "term": { "author_id": author } }));
    }
    json!({
            "size": query.limit,
            "track_total_hits": true,
            "query": { "bool": {
                "must": [{ "match": { "text": { "query": query.words.join(" "), "operator": "and" } } }],
                "filter": filter,
            } },
            "sort": [{ "_score": "desc" }, { "position": "desc" }],
            "highlight": {
                "pre_tags": [MARK_START.to_string()],
                "post_tags": [MARK_END.to_string()],
                "fields": { "text": { "number_of_fragments": 0 } },
            },
    })
}

/// The bulk op that writes `document` unless the stored one is as recent.
fn index_op(document: &Document) -> (Value, Value) {
    let id = document.message.message_id;
    let action = json!({ "index": { "_id": id, "version": document.applied, "version_type": "external" } });
    (action, source(document))
}

#[async_trait]
impl Projector for OpenSearch {
    fn name(&self) -> &'static str {
        "search"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        Ok(self.versioned().await?.stored)
    }

    /// Not atomic (see the module): a batch whose progress moved is refused before any write;
    /// otherwise its documents, each versioned, then its progress in a compare-and-set.
    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        let read = self.versioned().await?.unless_paused()?;
        check_moves(&batch.moves, |p| read.stored.partitions.get(p).map(|s| s.offset))?;
        let mut known = self.known(batch).await?;
        let folded = fold(&batch.events, &mut known);
        let channels = folded.channels.iter().map(|(channel, private, position)| {
            let action =
                json!({ "index": { "_id": channel_id(*channel), "version": position, "version_type": "external" } });
            (action, json!({ "channel_private": private }))
        });
        let documents = folded.changed.iter().map(|id| index_op(&known.documents[id]));
        let ops: Vec<(Value, Value)> = channels.chain(documents).collect();
        let there = !ops.is_empty() && self.write(ops).await?;
        // Effects already stored (by an attempt that stopped before its progress) may not be
        // searchable yet, and no write of this attempt waited for them: refresh before the
        // progress says they are applied.
        if there || folded.again {
            self.refresh().await?;
        }
        for (channel, private, _) in folded.channels {
            self.channels.insert(channel, private);
        }
        self.save(read, batch).await
    }

    /// OpenSearch tells no one of writes: the progress is looked at again every 100 ms.
    async fn changed(&self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn check_schema(&self) -> Result<(), ProjectionError> {
        match self.schema_version().await? {
            version if version < SCHEMA_VERSION => Err(crate::older_schema("search", version, SCHEMA_VERSION)),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Search for OpenSearch {
    async fn search(&self, query: &Query) -> Result<Hits, ProjectionError> {
        let request = query_body(query);
        let messages = self.messages();
        let indexes = [messages.as_str()];
        let search = self.client.search(SearchParts::Index(&indexes)).body(request);
        let answer = expect_success(search.send().await, &[]).await?;
        let hits = answer["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|hit| {
                let Some(document) = document_of(&hit["_source"]) else {
                    tracing::warn!(id = %hit["_id"], "a search hit that is not a message document");
                    return None;
                };
                let marked = hit["highlight"]["text"][0].as_str().unwrap_or(&document.message.text);
                Some(Hit { highlight: highlight(marked), message: MessageView::from(&document.message) })
            })
            .collect();
        let total = answer["hits"]["total"]["value"].as_u64().unwrap_or(0);
        Ok(Hits { hits, total })
    }

    async fn documents(&self, channel: Uuid) -> Result<Vec<Document>, ProjectionError> {
        let target = self.target();
        let indexes = [target.as_str()];
        let mut documents = Vec::new();
        let mut after: Option<u64> = None;
        loop {
            let mut body = json!({
                "query": { "term": { "channel_id": channel.to_string() } },
                "sort": [{ "position": "asc" }],
                "size": 1000,
            });
            if let Some(after) = after {
                body["search_after"] = json!([after]);
            }
            let search = self.client.search(SearchParts::Index(&indexes)).body(body);
            let answer = expect_success(search.send().await, &[]).await?;
            let hits = answer["hits"]["hits"].as_array().cloned().unwrap_or_default();
            for hit in &hits {
                let unreadable = || unavailable(format!("unreadable: {hit}"));
                documents.push(document_of(&hit["_source"]).ok_or_else(unreadable)?);
            }
            match documents.last() {
                Some(last) if hits.len() == 1000 => after = Some(last.message.position),
                _ => return Ok(documents),
            }
        }
    }
}

/// The live search model (the index behind the alias `{prefix}messages`) and a rebuild in the
/// next index of the same name (`…messages-2` beside `…messages-1`). A swap moves the alias in
/// one `_aliases` request.
pub struct OpenSearchVersions {
    live: Arc<OpenSearch>,
}

impl OpenSearchVersions {
    pub fn new(live: Arc<OpenSearch>) -> Self {
        OpenSearchVersions { live }
    }

    /// The live index, and the rebuild's beside it.
    async fn indexes(&self) -> Result<(String, String), ProjectionError> {
        let live = self.live.live_index().await?;
        let (name, generation) = live.rsplit_once('-').unwrap_or((live.as_str(), "0"));
        let next = generation.parse::<u64>().map_err(|_| unavailable(format!("unexpected live index {live}")))? + 1;
        Ok((live.clone(), format!("{name}-{next}")))
    }

    async fn delete_index(&self, index: &str) -> Result<(), ProjectionError> {
        let (indices, names) = (self.live.client.indices(), [index]);
        let delete = indices.delete(IndicesDeleteParts::Index(&names)).send().await;
        expect_success(delete, &["index_not_found_exception"]).await.map(|_| ())
    }
}

#[async_trait]
impl crate::replay::Versions for OpenSearchVersions {
    fn live(&self) -> Model {
        model(self.live.clone())
    }

    async fn rebuild(&self) -> Result<Model, ProjectionError> {
        let (_, rebuild) = self.indexes().await?;
        let rebuild = self.live.in_index(rebuild);
        rebuild.migrate().await?;
        Ok(model(Arc::new(rebuild)))
    }

    async fn discard(&self) -> Result<(), ProjectionError> {
        let (_, rebuild) = self.indexes().await?;
        self.delete_index(&rebuild).await
    }

    async fn unpause(&self) -> Result<(), ProjectionError> {
        self.live.set_pause(None).await
    }

    async fn pause(&self) -> Result<Box<dyn crate::replay::Paused>, ProjectionError> {
        let (live, rebuild) = self.indexes().await?;
        // Lapses if the replay dies; batches in flight fail their progress compare-and-set.
        let until = chrono::Utc::now().timestamp_millis() + 60_000;
        self.live.set_pause(Some(until)).await?;
        Ok(Box::new(PausedSearch { versions: OpenSearchVersions { live: self.live.clone() }, live, rebuild }))
    }
}

fn model(search: Arc<OpenSearch>) -> Model {
    Model { projector: search.clone(), contents: Arc::new(SearchContents(search)) }
}

struct PausedSearch {
    versions: OpenSearchVersions,
    live: String,
    rebuild: String,
}

#[async_trait]
impl crate::replay::Paused for PausedSearch {
    async fn live(&mut self) -> Result<Stored, ProjectionError> {
        self.versions.live.stored().await
    }

    async fn swap(&mut self, keep_old: bool) -> Result<(), crate::replay::SwapError> {
        let live = &self.versions.live;
        let rebuilt = live.in_index(self.rebuild.clone()).stored().await?;
        if let Some(partition) = crate::replay::behind(&live.stored().await?, &rebuilt) {
            return Err(crate::replay::SwapError::Behind(partition_key(&partition)));
        }
        let alias = live.messages();
        let actions = json!({ "actions": [
            { "remove": { "index": &self.live, "alias": &alias } },
            { "add": { "index": &self.rebuild, "alias": &alias } },
        ] });
        let indices = live.client.indices();
        expect_success(indices.update_aliases().body(actions).send().await, &[]).await?;
        if !keep_old && let Err(error) = self.versions.delete_index(&self.live).await {
            tracing::warn!(%error, index = self.live, "swapped; the old index is left to delete by hand");
        }
        Ok(())
    }

    async fn resume(self: Box<Self>) {
        let _ = self.versions.live.set_pause(None).await;
    }
}
