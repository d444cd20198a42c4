//! The counters of the embedded default: the same keyspace in memory, under one lock. Its
//! progress lives with it, so a restart starts both from nothing and the bus delivers the
//! whole log again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::RwLock;

use async_trait::async_trait;

use super::{Keyspace, Op};
use crate::{Move, ProjectionError, Stored, check_moves};

#[derive(Default)]
pub struct MemoryKeyspace {
    state: RwLock<State>,
    changed: crate::Changes,
}

/// Members by score, and each member's score.
type SortedSet = (BTreeSet<(u64, String)>, HashMap<String, u64>);

#[derive(Default)]
struct State {
    stored: Stored,
    zsets: HashMap<String, SortedSet>,
    hashes: HashMap<String, HashMap<String, String>>,
    sets: HashMap<String, HashSet<String>>,
}

impl State {
    fn run(&mut self, op: &Op) {
        match op {
            Op::ZAdd { key, score, member } => {
                let (ordered, scores) = self.zsets.entry(key.clone()).or_default();
                if let Some(old) = scores.insert(member.clone(), *score) {
                    ordered.remove(&(old, member.clone()));
                }
                ordered.insert((*score, member.clone()));
            }
            Op::ZRem { key, member } => {
                if let Some((ordered, scores)) = self.zsets.get_mut(key)
                    && let Some(score) = scores.remove(member)
                {
                    ordered.remove(&(score, member.clone()));
                }
            }
            Op::HSet { key, fields } => self.hashes.entry(key.clone()).or_default().extend(fields.iter().cloned()),
            Op::HDel { key, field } => {
                self.hashes.get_mut(key).map(|hash| hash.remove(field));
            }
            Op::Del { key } => {
                self.zsets.remove(key);
                self.hashes.remove(key);
                self.sets.remove(key);
            }
            Op::SAdd { key, member } => {
                self.sets.entry(key.clone()).or_default().insert(member.clone());
            }
            Op::SRem { key, member } => {
                self.sets.get_mut(key).map(|set| set.remove(member));
            }
        }
    }
}

impl MemoryKeyspace {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("never poisoned")
    }
}

#[async_trait]
impl Keyspace for MemoryKeyspace {
    async fn stored(&self) -> Result<Stored, ProjectionError> {
        Ok(self.read().stored.clone())
    }

    async fn commit(&self, moves: &[Move], dead_lettered: u64, ops: &[Op]) -> Result<(), ProjectionError> {
        {
            let mut state = self.state.write().expect("never poisoned");
            check_moves(moves, |p| state.stored.partitions.get(p).map(|s| s.offset))?;
            for op in ops {
                state.run(op);
            }
            state.stored.record(moves, dead_lettered);
        }
        self.changed.announce();
        Ok(())
    }

    async fn changed(&self) {
        self.changed.next().await;
    }

    async fn zcard(&self, key: &str) -> Result<u64, ProjectionError> {
        Ok(self.read().zsets.get(key).map_or(0, |(ordered, _)| ordered.len() as u64))
    }

    async fn zlast(&self, key: &str) -> Result<Option<String>, ProjectionError> {
        Ok(self.read().zsets.get(key).and_then(|(ordered, _)| ordered.last()).map(|(_, member)| member.clone()))
    }

    async fn zcounts(&self, queries: &[(String, u64)]) -> Result<Vec<u64>, ProjectionError> {
        let state = self.read();
        Ok(queries
            .iter()
            .map(|(key, min)| {
                state
                    .zsets
                    .get(key)
                    .map_or(0, |(ordered, _)| ordered.range((min.saturating_add(1), String::new())..).count() as u64)
            })
            .collect())
    }

    async fn hgetall(&self, key: &str) -> Result<HashMap<String, String>, ProjectionError> {
        Ok(self.read().hashes.get(key).cloned().unwrap_or_default())
    }

    async fn smembers(&self, key: &str) -> Result<Vec<String>, ProjectionError> {
        Ok(self.read().sets.get(key).map(|set| set.iter().cloned().collect()).unwrap_or_default())
    }
}
