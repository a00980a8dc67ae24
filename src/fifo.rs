//! [`FifoMap`]: a map holding at most a given number of entries, forgetting the oldest
//! insertions first. Backs the conversation -> account assignments (`routing.max_conversations`)
//! and the pool's tombstones (`pool.max_tombstones`), so neither grows with uptime.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// A map bounded by the `cap` given at each insert. Every insert is stamped with a sequence
/// number; the queue of stamps says which entry is oldest. Replacing a key leaves a stale
/// stamp behind, skipped on eviction and compacted away once stale stamps outnumber live ones.
pub struct FifoMap<K, V> {
    map: HashMap<K, (V, u64)>,
    order: VecDeque<(K, u64)>,
    seq: u64,
}

impl<K, V> Default for FifoMap<K, V> {
    fn default() -> Self {
        FifoMap {
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, V> FifoMap<K, V> {
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|(v, _)| v)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Inserts `key` (a replaced key counts as the newest), then forgets the oldest entries
    /// until at most `cap` remain. With `cap` 0 nothing is stored.
    pub fn insert(&mut self, key: K, value: V, cap: usize) {
        if cap == 0 {
            return;
        }
        self.seq += 1;
        self.map.insert(key.clone(), (value, self.seq));
        self.order.push_back((key, self.seq));
        while self.map.len() > cap {
            let Some((k, s)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|(_, cur)| *cur == s) {
                self.map.remove(&k);
            }
        }
        if self.order.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }

    /// Stamps queued (live and stale): bounded by `2 * len + 16`.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_insertions_go_first_and_replacing_refreshes() {
        let mut m = FifoMap::default();
        m.insert("a", 1, 2);
        m.insert("b", 2, 2);
        m.insert("a", 3, 2); // a is now the newest
        m.insert("c", 4, 2); // b goes
        assert_eq!(m.get(&"a"), Some(&3));
        assert_eq!(m.get(&"b"), None);
        assert_eq!(m.get(&"c"), Some(&4));
        assert_eq!(m.remove(&"a"), Some(3));
        assert_eq!(m.len(), 1);
        m.insert("d", 5, 0);
        assert_eq!(m.get(&"d"), None, "cap 0 stores nothing");
    }

    #[test]
    fn churn_stays_bounded() {
        let mut m = FifoMap::default();
        for i in 0..10_000u32 {
            m.insert(i % 50, i, 20);
            m.insert(100 + i, i, 20);
        }
        assert!(m.len() <= 20);
        assert!(m.queued() <= 2 * 20 + 16);
    }
}
