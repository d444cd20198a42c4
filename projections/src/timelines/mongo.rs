//! The timelines on MongoDB (FerretDB in infra/local): collection `messages`, one document per
//! message, indexed by {channel_id, position} (a page of a timeline is one range of it, on a
//! real MongoDB) and by {thread_root_id, position}; and one document `progress` in collection
//! `progress`, whose partitions are updated in one conditional write after the effects.
//!
//! Written for FerretDB's limits (../shared/FACTS.md): no transactions, and updates sent one by
//! one (an update command matching many documents can hang it); inserts in unordered batches,
//! where a duplicate (E11000) means already there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use uuid::Uuid;

use super::{Change, Message, MessageView, Op, Timelines, ops_of};
use crate::audit::{Model, TimelinesContents};
use crate::{Batch, Progress, ProjectionError, Projector, Stored, check_moves, parse_partition_key, partition_key};

const PROGRESS: &str = "progress";
/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11000;

/// The collection of the pointer to the live version.
const VERSIONS: &str = "versions";
/// The pointer's `_id`; its `live` names the live version's suffix ("" before any replay).
const POINTER: &str = "timelines";
/// How long a live model trusts the pointer it read.
const POINTER_TTL: Duration = Duration::from_secs(1);

/// The shape of the documents this build reads and writes; a model of an older version is
/// rebuilt by `quikapp replay mongo`.
pub const SCHEMA_VERSION: i32 = 1;

/// The collections of one version of the model: `messages{suffix}` and `progress{suffix}`.
#[derive(Clone)]
struct Collections {
    suffix: String,
    messages: Collection<Document>,
    progress: Collection<Document>,
}

pub struct MongoTimelines {
    database: mongodb::Database,
    /// A rebuild's suffix; `None`: the live version, the one the pointer names.
    fixed: Option<String>,
    pointed: std::sync::Mutex<Option<(std::time::Instant, Collections)>>,
}

fn unavailable(error: mongodb::error::Error) -> ProjectionError {
    ProjectionError::Unavailable(error.to_string())
}

/// A partition key as a field name: Kafka topic names never hold `~`, and field names must not
/// hold `.`.
fn field_of(partition: &quikapp_bus::Partition) -> String {
    partition_key(partition).replace('.', "~")
}

impl MongoTimelines {
    /// Connects to the database the URL names (`quikapp` when it names none).
    pub async fn connect(url: &str) -> Result<Self, ProjectionError> {
        let mut options = mongodb::options::ClientOptions::parse(url).await.map_err(unavailable)?;
        options.server_selection_timeout = Some(Duration::from_secs(5));
        options.connect_timeout = Some(Duration::from_secs(5));
        let client = mongodb::Client::with_options(options).map_err(unavailable)?;
        let database = client.default_database().unwrap_or_else(|| client.database("quikapp"));
        Ok(MongoTimelines { database, fixed: None, pointed: Default::default() })
    }

    fn collections_of(&self, suffix: &str) -> Collections {
        Collections {
            suffix: suffix.to_owned(),
            messages: self.database.collection(&format!("messages{suffix}")),
            progress: self.database.collection(&format!("{PROGRESS}{suffix}")),
        }
    }

    /// The live version's suffix, as the pointer says now.
    async fn pointer(&self) -> Result<String, ProjectionError> {
        Ok(self.pointer_and_pause().await?.0)
    }

    /// The live version's suffix, and until when (milliseconds since the epoch) a replay
    /// paused it, if it did. FerretDB updates a document by reading and writing it back whole,
    /// so the pause is in the pointer, which only replays write, not in the progress that
    /// projectors write.
    async fn pointer_and_pause(&self) -> Result<(String, Option<i64>), ProjectionError> {
        let versions = self.database.collection::<Document>(VERSIONS);
        let pointer = versions.find_one(doc! { "_id": POINTER }).await.map_err(unavailable)?;
        let live = pointer.as_ref().and_then(|p| p.get_str("live").ok()).unwrap_or_default();
        Ok((live.to_owned(), pointer.as_ref().and_then(|p| p.get_i64("paused_until").ok())))
    }

    /// Sets (or with `None`, ends) a replay's pause of the live version.
    async fn set_pause(&self, until: Option<i64>) -> Result<(), ProjectionError> {
        let versions = self.database.collection::<Document>(VERSIONS);
        let update = match until {
            Some(until) => doc! { "$set": { "paused_until": until } },
            None => doc! { "$unset": { "paused_until": "" } },
        };
        versions.update_one(doc! { "_id": POINTER }, update).upsert(true).await.map(|_| ()).map_err(unavailable)
    }

    /// This model's collections: the rebuild's, or the live version's (the pointer read at
    /// most [`POINTER_TTL`] ago).
    async fn collections(&self) -> Result<Collections, ProjectionError> {
        if let Some(suffix) = &self.fixed {
            return Ok(self.collections_of(suffix));
        }
        if let Some((at, collections)) = &*self.pointed.lock().expect("not poisoned")
            && at.elapsed() < POINTER_TTL
        {
            return Ok(collections.clone());
        }
        let collections = self.collections_of(&self.pointer().await?);
        *self.pointed.lock().expect("not poisoned") = Some((std::time::Instant::now(), collections.clone()));
        Ok(collections)
    }

    /// The progress document of `collections`.
    async fn progress(&self, collections: &Collections) -> Result<Stored, ProjectionError> {
        let found = collections.progress.find_one(doc! { "_id": PROGRESS }).await.map_err(unavailable)?;
        let Some(document) = found else { return Ok(Stored::default()) };
        let partitions = document
            .get_document("partitions")
            .map(|partitions| {
                partitions
                    .iter()
                    .filter_map(|(field, value)| {
                        let progress = value.as_document()?;
                        let partition = parse_partition_key(&field.replace('~', "."))?;
                        let offset = progress.get_i64("offset").ok()? as u64;
                        let watermark = progress.get_i64("watermark").ok()? as u64;
                        Some((partition, Progress { offset, watermark }))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let dead_lettered = document.get_i64("dead_lettered").unwrap_or(0) as u64;
        Ok(Stored { partitions, dead_lettered })
    }

    /// Creates the indexes and the progress document when missing.
    pub async fn migrate(&self) -> Result<(), ProjectionError> {
        self.create_indexes().await?;
        self.create_progress().await
    }

    /// The indexes the reads need beside `_id` (which the writes need). A rebuild makes them
    /// once its history is written: FerretDB builds one over the documents faster than it keeps
    /// it up to date insert by insert.
    async fn create_indexes(&self) -> Result<(), ProjectionError> {
        let c = self.collections().await?;
        let timeline = IndexModel::builder()
            .keys(doc! { "channel_id": 1, "position": -1 })
            .options(IndexOptions::builder().name("timeline".to_owned()).build())
            .build();
        let thread = IndexModel::builder()
            .keys(doc! { "thread_root_id": 1, "position": 1 })
            .options(IndexOptions::builder().name("thread".to_owned()).build())
            .build();
        // Only the missing ones: FerretDB 1.24 drops the connection when asked to create an
        // index that exists. A collection not made yet has none (and answers an error).
        let existing = c.messages.list_index_names().await.unwrap_or_default();
        let missing: Vec<IndexModel> = [timeline, thread]
            .into_iter()
            .filter(|index| index.options.as_ref().and_then(|o| o.name.as_ref()).is_none_or(|n| !existing.contains(n)))
            .collect();
        if !missing.is_empty()
            && let Err(error) = c.messages.create_indexes(missing).await
        {
            // Another process starting at the same moment may have made them meanwhile.
            let now = c.messages.list_index_names().await.map_err(unavailable)?;
            if !["timeline", "thread"].iter().all(|name| now.iter().any(|n| n == name)) {
                return Err(unavailable(error));
            }
        }
        Ok(())
    }

    async fn create_progress(&self) -> Result<(), ProjectionError> {
        let c = self.collections().await?;
        let initial = doc! { "partitions": {}, "dead_lettered": 0_i64, "schema_version": SCHEMA_VERSION };
        c.progress
            .update_one(doc! { "_id": PROGRESS }, doc! { "$setOnInsert": initial })
            .upsert(true)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn schema_version(&self) -> Result<i32, ProjectionError> {
        let c = self.collections().await?;
        let progress = c.progress.find_one(doc! { "_id": PROGRESS }).await.map_err(unavailable)?;
        Ok(progress.and_then(|p| p.get_i32("schema_version").ok()).unwrap_or(1))
    }

    pub async fn ping(&self) -> Result<(), ProjectionError> {
        let c = self.collections().await?;
        c.progress.find_one(doc! { "_id": PROGRESS }).await.map(|_| ()).map_err(unavailable)
    }

    async fn write(&self, c: &Collections, op: Op) -> Result<(), ProjectionError> {
        let (filter, update) = match op {
            Op::Insert(_) => unreachable!("inserts go in batches"),
            Op::Change { message_id, version, change } => {
                let version = version as i64;
                let filter = doc! { "_id": message_id.to_string(), "version": { "$lt": version } };
                let update = match change {
                    Change::Edit { text, edited_at } => {
                        doc! { "$set": { "text": text, "edited_at": timestamp(&edited_at), "version": version } }
                    }
                    Change::Delete => doc! { "$set": { "deleted": true, "version": version } },
                    Change::React { user, emoji } => {
                        doc! { "$addToSet": { "reactions": reaction(user, &emoji) }, "$set": { "version": version } }
                    }
                    Change::Unreact { user, emoji } => {
                        doc! { "$pull": { "reactions": reaction(user, &emoji) }, "$set": { "version": version } }
                    }
                };
                (filter, update)
            }
            Op::AddReply { root, reply } => {
                (doc! { "_id": root.to_string() }, doc! { "$addToSet": { "replies": reply.to_string() } })
            }
            Op::RemoveReply { root, reply } => {
                (doc! { "_id": root.to_string() }, doc! { "$pull": { "replies": reply.to_string() } })
            }
        };
        c.messages.update_one(filter, update).await.map(|_| ()).map_err(unavailable)
    }

    /// Inserts `messages`, in chunks two at a time (a FerretDB insert spends as much time in
    /// FerretDB as in PostgreSQL behind it); answers those that were there already.
    async fn insert(&self, c: &Collections, messages: Vec<Message>) -> Result<Vec<Uuid>, ProjectionError> {
        type Inserting<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Vec<Uuid>, ProjectionError>> + Send + 'a>>;
        let chunks: Vec<Inserting<'_>> =
            messages.chunks(INSERT_CHUNK).map(|chunk| Box::pin(self.insert_chunk(c, chunk)) as Inserting<'_>).collect();
        let present: Vec<Vec<Uuid>> = futures::stream::iter(chunks).buffer_unordered(2).try_collect().await?;
        Ok(present.into_iter().flatten().collect())
    }

    async fn insert_chunk(&self, c: &Collections, messages: &[Message]) -> Result<Vec<Uuid>, ProjectionError> {
        let documents: Vec<Document> = messages.iter().map(document).collect();
        match c.messages.insert_many(documents).ordered(false).await {
            Ok(_) => Ok(vec![]),
            Err(error) => match error.kind.as_ref() {
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(errors),
                    write_concern_error: None,
                    ..
                }) if errors.iter().all(|e| e.code == DUPLICATE_KEY) => {
                    Ok(errors.iter().filter_map(|e| messages.get(e.index)).map(|m| m.message_id).collect())
                }
                ErrorKind::InsertMany(InsertManyError { write_errors: Some(errors), .. }) => {
                    Err(ProjectionError::Rejected(format!("{:?}", errors.first().map(|e| &e.message))))
                }
                _ => Err(unavailable(error)),
            },
        }
    }
}

/// Messages per insert command.
const INSERT_CHUNK: usize = 10_000;

fn timestamp(at: &DateTime<Utc>) -> String {
    quikapp_domain::event::timestamp::format(at)
}

/// A reaction as stored: emoji have no blanks, so the pair is unambiguous.
fn reaction(user: Uuid, emoji: &str) -> String {
    format!("{user} {emoji}")
}

fn document(message: &Message) -> Document {
    doc! {
        "_id": message.message_id.to_string(),
        "channel_id": message.channel_id.to_string(),
        "author_id": message.author_id.to_string(),
        "text": &message.text,
        "thread_root_id": message.thread_root_id.map(|r| r.to_string()),
        "replies": message.replies.iter().map(Uuid::to_string).collect::<Vec<_>>(),
        "reactions": message.reactions.iter().map(|(u, e)| reaction(*u, e)).collect::<Vec<_>>(),
        "posted_at": timestamp(&message.posted_at),
        "edited_at": message.edited_at.as_ref().map(timestamp),
        "position": message.position as i64,
        "version": message.version as i64,
        "deleted": message.deleted,
    }
}

fn message_of(document: &Document) -> Option<Message> {
    let uuid = |key: &str| document.get_str(key).ok().and_then(|s| s.parse().ok());
    let time = |key: &str| {
        document.get_str(key).ok().and_then(|s| DateTime::parse_from_rfc3339(s).ok()).map(|t| t.with_timezone(&Utc))
    };
    let strings = |key: &str| -> Vec<String> {
        document
            .get_array(key)
            .map(|items| items.iter().filter_map(Bson::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    Some(Message {
        message_id: uuid("_id")?,
        channel_id: uuid("channel_id")?,
        author_id: uuid("author_id")?,
        text: document.get_str("text").ok()?.to_owned(),
        thread_root_id: uuid("thread_root_id"),
        replies: strings("replies").iter().filter_map(|r| r.parse().ok()).collect(),
        reactions: strings("reactions")
            .iter()
            .filter_map(|r| r.split_once(' ').and_then(|(u, e)| Some((u.parse().ok()?, e.to_owned()))))
            .collect(),
        posted_at: time("posted_at")?,
        edited_at: time("edited_at"),
        position: document.get_i64("position").ok()? as u64,
        version: document.get_i64("version").ok()? as u64,
        deleted: document.get_bool("deleted").unwrap_or(false),
    })
}

#[async_trait]
impl Projector for MongoTimelines {
    fn name(&self) -> &'static str {
        "mongo"
    }

    async fn stored(&self) -> Result<Stored, ProjectionError> {
        self.progress(&self.collections().await?).await
    }

    /// Not atomic (see the module): a batch whose progress moved is refused before any write;
    /// otherwise its writes, each idempotent, then its progress in one conditional write.
    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        // The live version as the pointer says now, not as cached for reads: a swap moves the
        // projectors at once.
        let c = match &self.fixed {
            Some(suffix) => self.collections_of(suffix),
            None => {
                let (live, paused_until) = self.pointer_and_pause().await?;
                if paused_until.is_some_and(|until| until > chrono::Utc::now().timestamp_millis()) {
                    return Err(ProjectionError::Unavailable("paused for a replay to swap in its rebuild".into()));
                }
                self.collections_of(&live)
            }
        };
        let stored = self.progress(&c).await?;
        check_moves(&batch.moves, |p| stored.partitions.get(p).map(|s| s.offset))?;
        // A change to a message this batch inserts is made to it before the insert: one
        // document written instead of an insert and an update per change (each update scans the
        // table on FerretDB), which is what makes a replay's large batches fast.
        let (mut inserts, mut at, mut updates) = (Vec::new(), HashMap::new(), Vec::new());
        for op in ops_of(&batch.events) {
            match op {
                Op::Insert(message) => {
                    at.insert(message.message_id, inserts.len());
                    inserts.push(message);
                }
                op => match at.get(&op.target()) {
                    Some(&i) => drop(inserts[i].apply(op)),
                    None => updates.push(op),
                },
            }
        }
        // A message already there (an earlier attempt at this batch, or an event delivered
        // twice) gets the changes folded into it as updates, each conditional on its version.
        let present: std::collections::HashSet<Uuid> = self.insert(&c, inserts).await?.into_iter().collect();
        if !present.is_empty() {
            let folded = ops_of(&batch.events).into_iter().filter(|op| !matches!(op, Op::Insert(_)));
            updates.extend(folded.filter(|op| present.contains(&op.target())));
        }
        for op in updates {
            self.write(&c, op).await?;
        }
        let mut filter = doc! { "_id": PROGRESS };
        let mut set = Document::new();
        for step in &batch.moves {
            let field = format!("partitions.{}", field_of(&step.partition));
            match step.from {
                Some(offset) => filter.insert(format!("{field}.offset"), offset as i64),
                None => filter.insert(field.clone(), doc! { "$exists": false }),
            };
            set.insert(field, doc! { "offset": step.to.offset as i64, "watermark": step.to.watermark as i64 });
        }
        let update = doc! { "$set": set, "$inc": { "dead_lettered": batch.dead_lettered as i64 } };
        let saved = c.progress.update_one(filter, update).await.map_err(unavailable)?;
        if saved.matched_count == 0 {
            return Err(ProjectionError::Moved("another member stored this progress first".into()));
        }
        Ok(())
    }

    /// FerretDB has no change streams: the progress is looked at again every 100 ms.
    async fn changed(&self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn check_schema(&self) -> Result<(), ProjectionError> {
        match self.schema_version().await? {
            version if version < SCHEMA_VERSION => Err(crate::older_schema("mongo", version, SCHEMA_VERSION)),
            _ => Ok(()),
        }
    }
}

impl MongoTimelines {
    async fn find(
        &self,
        filter: Document,
        sort: Document,
        limit: Option<i64>,
    ) -> Result<Vec<MessageView>, ProjectionError> {
        let collections = self.collections().await?;
        let mut find = collections.messages.find(filter).sort(sort);
        if let Some(limit) = limit {
            find = find.limit(limit);
        }
        let documents: Vec<Document> = find.await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
        Ok(documents.iter().filter_map(message_of).map(|m| MessageView::from(&m)).collect())
    }
}

#[async_trait]
impl Timelines for MongoTimelines {
    async fn page(
        &self,
        channel_id: Uuid,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<MessageView>, ProjectionError> {
        let mut filter = doc! { "channel_id": channel_id.to_string(), "thread_root_id": Bson::Null, "deleted": false };
        if let Some(before) = before {
            filter.insert("position", doc! { "$lt": before as i64 });
        }
        self.find(filter, doc! { "position": -1 }, Some(limit as i64)).await
    }

    async fn message(&self, channel_id: Uuid, message_id: Uuid) -> Result<Option<MessageView>, ProjectionError> {
        let filter = doc! { "_id": message_id.to_string(), "channel_id": channel_id.to_string(), "deleted": false };
        let found = self.collections().await?.messages.find_one(filter).await.map_err(unavailable)?;
        Ok(found.as_ref().and_then(message_of).map(|m| MessageView::from(&m)))
    }

    async fn replies(&self, channel_id: Uuid, root: Uuid) -> Result<Vec<MessageView>, ProjectionError> {
        let filter =
            doc! { "thread_root_id": root.to_string(), "channel_id": channel_id.to_string(), "deleted": false };
        self.find(filter, doc! { "position": 1 }, None).await
    }
}

/// The live timelines (the version the pointer names) and a rebuild in the next version's
/// collections. A swap is one write of the pointer; the old collections are dropped once no
/// live model can still trust a pointer read before it.
pub struct MongoVersions {
    live: Arc<MongoTimelines>,
}

impl MongoVersions {
    pub fn new(live: Arc<MongoTimelines>) -> Self {
        MongoVersions { live }
    }

    /// The live version's suffix and the rebuild's: `""` → `_2`, `_2` → `_3`...
    async fn suffixes(&self) -> Result<(String, String), ProjectionError> {
        let live = self.live.pointer().await?;
        let generation: u64 = live.strip_prefix('_').and_then(|n| n.parse().ok()).unwrap_or(1);
        Ok((live, format!("_{}", generation + 1)))
    }

    fn rebuilt(&self, suffix: String) -> MongoTimelines {
        MongoTimelines { database: self.live.database.clone(), fixed: Some(suffix), pointed: Default::default() }
    }
}

async fn drop_version(collections: &Collections) -> Result<(), ProjectionError> {
    collections.messages.drop().await.map_err(unavailable)?;
    collections.progress.drop().await.map_err(unavailable)
}

#[async_trait]
impl crate::replay::Versions for MongoVersions {
    fn live(&self) -> Model {
        model(self.live.clone())
    }

    async fn rebuild(&self) -> Result<Model, ProjectionError> {
        let (_, rebuild) = self.suffixes().await?;
        let rebuild = self.rebuilt(rebuild);
        rebuild.create_progress().await?;
        Ok(model(Arc::new(rebuild)))
    }

    async fn index(&self) -> Result<(), ProjectionError> {
        let (_, rebuild) = self.suffixes().await?;
        self.rebuilt(rebuild).create_indexes().await
    }

    /// FerretDB scans the table for every update: with a million events a batch, a message's
    /// edits, reactions and replies are folded into its one insert nearly always.
    fn history_batch(&self) -> u32 {
        1_000_000
    }

    async fn discard(&self) -> Result<(), ProjectionError> {
        let (_, rebuild) = self.suffixes().await?;
        drop_version(&self.live.collections_of(&rebuild)).await
    }

    async fn unpause(&self) -> Result<(), ProjectionError> {
        self.live.set_pause(None).await
    }

    async fn pause(&self) -> Result<Box<dyn crate::replay::Paused>, ProjectionError> {
        let (live, rebuild) = self.suffixes().await?;
        let live = self.live.collections_of(&live);
        // Lapses if the replay dies. Batches that began before it still end (see `swap`).
        self.live.set_pause(Some(chrono::Utc::now().timestamp_millis() + 60_000)).await?;
        Ok(Box::new(PausedTimelines { model: self.live.clone(), live, rebuild: self.live.collections_of(&rebuild) }))
    }
}

fn model(timelines: Arc<MongoTimelines>) -> Model {
    Model { projector: timelines.clone(), contents: Arc::new(TimelinesContents(timelines)) }
}

struct PausedTimelines {
    model: Arc<MongoTimelines>,
    live: Collections,
    rebuild: Collections,
}

#[async_trait]
impl crate::replay::Paused for PausedTimelines {
    async fn live(&mut self) -> Result<Stored, ProjectionError> {
        self.model.progress(&self.live).await
    }

    /// Without transactions, a batch that began before the pause may still store its progress
    /// between this comparison and the pointer's write. Nothing is lost: the projectors go on
    /// from the rebuild's own progress and apply that batch there too. Until they have,
    /// readers see the timelines as they were a moment before.
    async fn swap(&mut self, keep_old: bool) -> Result<(), crate::replay::SwapError> {
        let live = self.model.progress(&self.live).await?;
        let rebuilt = self.model.progress(&self.rebuild).await?;
        if let Some(partition) = crate::replay::behind(&live, &rebuilt) {
            return Err(crate::replay::SwapError::Behind(partition_key(&partition)));
        }
        let versions = self.model.database.collection::<Document>(VERSIONS);
        let point = doc! { "$set": { "live": &self.rebuild.suffix }, "$unset": { "paused_until": "" } };
        versions.update_one(doc! { "_id": POINTER }, point).upsert(true).await.map_err(unavailable)?;
        if !keep_old {
            // Readers and projectors trust a pointer for POINTER_TTL: the old version is read
            // (paused, so as the rebuild had it) until then.
            tokio::time::sleep(POINTER_TTL * 2).await;
            if let Err(error) = drop_version(&self.live).await {
                tracing::warn!(%error, suffix = self.live.suffix, "swapped; the old collections are left to drop by hand");
            }
        }
        Ok(())
    }

    async fn resume(self: Box<Self>) {
        let _ = self.model.set_pause(None).await;
    }
}
