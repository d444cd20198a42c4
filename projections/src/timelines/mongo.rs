//! The timelines on MongoDB (FerretDB in infra/local): collection `messages`, one document per
//! message, indexed by {channel_id, position} (a page of a timeline is one range of it, on a
//! real MongoDB) and by {thread_root_id, position}; and one document `progress` in collection
//! `progress`, whose partitions are updated in one conditional write after the effects.
//!
//! Written for FerretDB's limits (../shared/FACTS.md): no transactions, and updates sent one by
//! one (an update command matching many documents can hang it); inserts in unordered batches,
//! where a duplicate (E11000) means already there.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use uuid::Uuid;

use super::{Change, Message, MessageView, Op, Timelines, ops_of};
use crate::{Batch, Progress, ProjectionError, Projector, Stored, check_moves, parse_partition_key, partition_key};

const PROGRESS: &str = "progress";
/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11000;

pub struct MongoTimelines {
    messages: Collection<Document>,
    progress: Collection<Document>,
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
        Ok(MongoTimelines { messages: database.collection("messages"), progress: database.collection(PROGRESS) })
    }

    /// Creates the indexes and the progress document when missing.
    pub async fn migrate(&self) -> Result<(), ProjectionError> {
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
        let existing = self.messages.list_index_names().await.unwrap_or_default();
        let missing: Vec<IndexModel> = [timeline, thread]
            .into_iter()
            .filter(|index| index.options.as_ref().and_then(|o| o.name.as_ref()).is_none_or(|n| !existing.contains(n)))
            .collect();
        if !missing.is_empty()
            && let Err(error) = self.messages.create_indexes(missing).await
        {
            // Another process starting at the same moment may have made them meanwhile.
            let now = self.messages.list_index_names().await.map_err(unavailable)?;
            if !["timeline", "thread"].iter().all(|name| now.iter().any(|n| n == name)) {
                return Err(unavailable(error));
            }
        }
        self.progress
            .update_one(doc! { "_id": PROGRESS }, doc! { "$setOnInsert": { "partitions": {}, "dead_lettered": 0_i64 } })
            .upsert(true)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), ProjectionError> {
        self.progress.find_one(doc! { "_id": PROGRESS }).await.map(|_| ()).map_err(unavailable)
    }

    async fn write(&self, op: Op) -> Result<(), ProjectionError> {
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
        self.messages.update_one(filter, update).await.map(|_| ()).map_err(unavailable)
    }

    async fn insert(&self, messages: Vec<Message>) -> Result<(), ProjectionError> {
        if messages.is_empty() {
            return Ok(());
        }
        let documents: Vec<Document> = messages.iter().map(document).collect();
        match self.messages.insert_many(documents).ordered(false).await {
            Ok(_) => Ok(()),
            Err(error) => match error.kind.as_ref() {
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(errors),
                    write_concern_error: None,
                    ..
                }) if errors.iter().all(|e| e.code == DUPLICATE_KEY) => {
                    Ok(()) // already there: a batch applied again
                }
                ErrorKind::InsertMany(InsertManyError { write_errors: Some(errors), .. }) => {
                    Err(ProjectionError::Rejected(format!("{:?}", errors.first().map(|e| &e.message))))
                }
                _ => Err(unavailable(error)),
            },
        }
    }
}

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
        let Some(document) = self.progress.find_one(doc! { "_id": PROGRESS }).await.map_err(unavailable)? else {
            return Ok(Stored::default());
        };
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

    /// Not atomic (see the module): a batch whose progress moved is refused before any write;
    /// otherwise its writes, each idempotent, then its progress in one conditional write.
    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        let stored = self.stored().await?;
        check_moves(&batch.moves, |p| stored.partitions.get(p).map(|s| s.offset))?;
        let ops = ops_of(&batch.events);
        let inserts: Vec<Message> = ops
            .iter()
            .filter_map(|op| if let Op::Insert(message) = op { Some(message.clone()) } else { None })
            .collect();
        self.insert(inserts).await?;
        for op in ops.into_iter().filter(|op| !matches!(op, Op::Insert(_))) {
            self.write(op).await?;
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
        let saved = self.progress.update_one(filter, update).await.map_err(unavailable)?;
        if saved.matched_count == 0 {
            return Err(ProjectionError::Moved("another member stored this progress first".into()));
        }
        Ok(())
    }

    /// FerretDB has no change streams: the progress is looked at again every 100 ms.
    async fn changed(&self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl MongoTimelines {
    async fn find(
        &self,
        filter: Document,
        sort: Document,
        limit: Option<i64>,
    ) -> Result<Vec<MessageView>, ProjectionError> {
        let mut find = self.messages.find(filter).sort(sort);
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
        let found = self.messages.find_one(filter).await.map_err(unavailable)?;
        Ok(found.as_ref().and_then(message_of).map(|m| MessageView::from(&m)))
    }

    async fn replies(&self, channel_id: Uuid, root: Uuid) -> Result<Vec<MessageView>, ProjectionError> {
        let filter =
            doc! { "thread_root_id": root.to_string(), "channel_id": channel_id.to_string(), "deleted": false };
        self.find(filter, doc! { "position": 1 }, None).await
    }
}
