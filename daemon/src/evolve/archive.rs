//! MAP-Elites archive: the best candidate seen in each cell of a small behaviour grid, so the search
//! keeps diverse stepping stones (policies that split little or much, with fine or coarse tiles)
//! instead of collapsing onto one lineage.

use crate::policy::Policy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bins of the non-native FLOP share: 0 (all native) then five equal bins of (0, 1].
pub const SHARE_BINS: usize = 6;
/// Bins of tile granularity: 0 (nothing split), then log2(tile) in [3,5), [5,7), [7,9), [9, ∞).
pub const TILE_BINS: usize = 5;

/// A cell of the grid.
pub type Cell = (usize, usize);

/// Maps features (non-native share, mean log2 tile) to a cell.
pub fn cell_of(share: f64, tile_log2: f64) -> Cell {
    let s = if share <= 0.0 { 0 } else { ((share * 5.0).ceil() as usize).clamp(1, SHARE_BINS - 1) };
    let t = if share <= 0.0 || tile_log2 <= 0.0 { 0 } else { (((tile_log2 - 3.0) / 2.0).floor().max(0.0) as usize + 1).min(TILE_BINS - 1) };
    (s, t)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Elite {
    pub key: String,
    pub policy: Policy,
    pub fitness: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Archive {
    /// Serialized with string keys (`"s,t"`) so the state stays plain JSON.
    cells: BTreeMap<String, Elite>,
}

impl Archive {
    /// Offers a candidate; returns true when it became its cell's elite.
    pub fn offer(&mut self, cell: Cell, elite: Elite) -> bool {
        let k = format!("{},{}", cell.0, cell.1);
        match self.cells.get(&k) {
            Some(cur) if cur.fitness >= elite.fitness => false,
            _ => {
                self.cells.insert(k, elite);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    pub fn elites(&self) -> impl Iterator<Item = &Elite> {
        self.cells.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_and_replacement() {
        assert_eq!(cell_of(0.0, 0.0), (0, 0));
        assert_eq!(cell_of(1.0, 4.0), (5, 1));
        assert_eq!(cell_of(0.01, 12.0), (1, 4));
        let mut a = Archive::default();
        let e = |f| Elite { key: format!("{f}"), policy: Policy::native(), fitness: f };
        assert!(a.offer((1, 1), e(0.9)));
        assert!(!a.offer((1, 1), e(0.8)));
        assert!(a.offer((1, 1), e(1.1)));
        assert!(a.offer((2, 1), e(0.5)));
        assert_eq!(a.len(), 2);
        assert_eq!(a.elites().map(|x| x.fitness).fold(0.0, f64::max), 1.1);
    }
}
