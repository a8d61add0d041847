//! A slab of requests in flight, indexed by a small integer that travels as
//! the lower request's tag. Freed slots are reused, so the table stays as
//! large as the deepest queue seen and no request allocates.

pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
    live: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Store `v`; returns its index.
    pub(crate) fn insert(&mut self, v: T) -> usize {
        self.insert_with(|| v)
    }

    /// Store the value `make` returns; returns its index. The value is built
    /// after its slot is found, so it can be written straight into it.
    #[inline]
    pub(crate) fn insert_with(&mut self, make: impl FnOnce() -> T) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                match &mut self.items[i] {
                    slot @ None => *slot = Some(make()),
                    Some(_) => unreachable!("free index {i} is live"),
                }
                i
            }
            None => {
                self.items.push(Some(make()));
                self.items.len() - 1
            }
        }
    }

    /// The entry at `i`, if live.
    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(Option::as_mut)
    }

    /// Remove and return the entry at `i`, freeing its index.
    pub(crate) fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.items.get_mut(i)?.take()?;
        self.free.push(i);
        self.live -= 1;
        Some(v)
    }

    /// Drop the entry at `i` and free its index (no-op if not live), without
    /// handing the value back as [`Slab::remove`] does.
    pub(crate) fn free(&mut self, i: usize) {
        if let Some(slot) = self.items.get_mut(i) {
            if slot.is_some() {
                // Dropped where it lies: moving the entry out first reads back
                // fields written moments ago with wider loads, which stalls.
                *slot = None;
                self.free.push(i);
                self.live -= 1;
            }
        }
    }

    /// Live entries.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter().flatten()
    }

    /// Remove every live entry, handing them out.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.live = 0;
        self.items.drain(..).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn indices_are_reused_and_counted() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "a freed index is not live");
        assert_eq!(s.insert("c"), a, "the freed index is reused");
        *s.get_mut(b).unwrap() = "B";
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), ["c", "B"]);
        assert_eq!(s.len(), 2);
        s.free(b);
        assert_eq!(s.len(), 1, "free drops the entry");
        s.free(b);
        assert_eq!(s.len(), 1, "freeing a dead index changes nothing");
        assert_eq!(s.insert("d"), b, "the index freed in place is reused");
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), ["c", "d"]);
        assert_eq!(s.drain().collect::<Vec<_>>(), ["c", "d"]);
        assert!(s.is_empty());
        assert_eq!(s.insert("e"), 0, "a drained slab starts over");
    }
}
