//! The device mesh: one rank grid for the whole topology, every subgroup a slice of it.
//!
//! Ranks are laid out row-major over the named axes, the last axis fastest:
//! with axes `[("dp", 2), ("sp", 4)]`, rank = dp * 4 + sp, so the SP groups are the contiguous
//! ranks {0,1,2,3} and {4,5,6,7} (as in DeepSpeed) and the DP groups are {0,4}, {1,5}, ...
//! With `[("dp", D), ("sp", S), ("tp", T)]` the TP groups are contiguous (as in Megatron-LM) and
//! SP ranks are T apart. For the Ulysses x ring hybrid, split SP as `[("ring", R), ("ulysses", U)]`:
//! Ulysses groups contiguous (the all-to-all stays inside a node), rings across them.

use std::collections::BTreeMap;

use super::group::Group;
use crate::{Error, Result};

/// The named axes of a mesh and their sizes, outermost first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshShape {
    axes: Vec<(String, usize)>,
}

impl MeshShape {
    /// A mesh over `axes` (outermost first). Names must be distinct, sizes at least 1.
    pub fn new(axes: &[(&str, usize)]) -> Result<MeshShape> {
        let bad = |msg: String| Error::InvalidArgument { op: "mesh", group: format!("{axes:?}"), msg };
        for (i, (name, size)) in axes.iter().enumerate() {
            if *size == 0 {
                return Err(bad(format!("axis {name:?} has size 0")));
            }
            if axes[..i].iter().any(|(other, _)| other == name) {
                return Err(bad(format!("axis {name:?} appears twice")));
            }
        }
        Ok(MeshShape { axes: axes.iter().map(|(n, s)| (n.to_string(), *s)).collect() })
    }

    /// Data parallel x sequence parallel; SP groups are contiguous ranks.
    pub fn dp_sp(dp: usize, sp: usize) -> Result<MeshShape> {
        MeshShape::new(&[("dp", dp), ("sp", sp)])
    }

    /// Number of ranks the mesh spans.
    pub fn world_size(&self) -> usize {
        self.axes.iter().map(|(_, s)| s).product()
    }

    /// The axes, outermost first.
    pub fn axes(&self) -> impl Iterator<Item = (&str, usize)> {
        self.axes.iter().map(|(n, s)| (n.as_str(), *s))
    }

    /// Size of one axis.
    pub fn size(&self, axis: &str) -> Result<usize> {
        self.index(axis).map(|i| self.axes[i].1)
    }

    /// `rank`'s coordinate on every axis, outermost first.
    pub fn coords(&self, rank: usize) -> Vec<usize> {
        let mut rest = rank;
        let mut coords = vec![0; self.axes.len()];
        for (c, (_, size)) in coords.iter_mut().zip(&self.axes).rev() {
            *c = rest % size;
            rest /= size;
        }
        coords
    }

    /// The ranks that share `rank`'s coordinates off `axes`, ordered row-major over `axes`
    /// (in the order the mesh lists them). These are the members of `rank`'s group for `axes`.
    pub fn group_ranks(&self, axes: &[&str], rank: usize) -> Result<Vec<usize>> {
        let picked = self.picked(axes)?;
        let mine = self.coords(rank);
        Ok((0..self.world_size())
            .filter(|&r| {
                let c = self.coords(r);
                (0..c.len()).all(|i| picked[i] || c[i] == mine[i])
            })
            .collect())
    }

    fn index(&self, axis: &str) -> Result<usize> {
        self.axes.iter().position(|(n, _)| n == axis).ok_or_else(|| Error::InvalidArgument {
            op: "mesh",
            group: format!("{:?}", self.axes),
            msg: format!("no axis named {axis:?}"),
        })
    }

    /// For each mesh axis, whether it is one of `axes`.
    fn picked(&self, axes: &[&str]) -> Result<Vec<bool>> {
        let mut picked = vec![false; self.axes.len()];
        for a in axes {
            picked[self.index(a)?] = true;
        }
        Ok(picked)
    }

    /// (colour, key) of `rank` when splitting the world into the groups of `axes`: the colour
    /// numbers the coordinates off `axes`, the key those on `axes`, both row-major.
    fn colour_key(&self, axes: &[&str], rank: usize) -> Result<(usize, usize)> {
        let picked = self.picked(axes)?;
        let (mut colour, mut key) = (0, 0);
        for ((c, (_, size)), on) in self.coords(rank).into_iter().zip(&self.axes).zip(picked) {
            if on {
                key = key * size + c;
            } else {
                colour = colour * size + c;
            }
        }
        Ok((colour, key))
    }
}

/// One rank's view of the mesh: its coordinates and its group on every axis.
#[derive(Debug, Clone)]
pub struct Mesh {
    shape: MeshShape,
    world: Group,
    groups: BTreeMap<String, Group>,
}

impl Mesh {
    /// Splits `world` into the groups of every axis. Every rank must call it with the same shape.
    pub fn new(world: &Group, shape: MeshShape) -> Result<Mesh> {
        if shape.world_size() != world.size() {
            return Err(Error::InvalidArgument {
                op: "mesh",
                group: world.info().to_string(),
                msg: format!(
                    "mesh {:?} spans {} ranks but the world has {}",
                    shape.axes,
                    shape.world_size(),
                    world.size()
                ),
            });
        }
        let mut mesh = Mesh { shape, world: world.clone(), groups: BTreeMap::new() };
        let names: Vec<String> = mesh.shape.axes.iter().map(|(n, _)| n.clone()).collect();
        for name in names {
            let group = mesh.subgroup(&[&name])?;
            mesh.groups.insert(name, group);
        }
        Ok(mesh)
    }

    pub fn shape(&self) -> &MeshShape {
        &self.shape
    }

    /// The world group the mesh was cut from.
    pub fn world(&self) -> &Group {
        &self.world
    }

    /// This rank's group along one axis.
    pub fn group(&self, axis: &str) -> Result<&Group> {
        self.shape.index(axis)?;
        self.groups.get(axis).ok_or_else(|| Error::InvalidArgument {
            op: "mesh",
            group: self.world.info().to_string(),
            msg: format!("no group for axis {axis:?}"),
        })
    }

    /// This rank's coordinate on one axis.
    pub fn coord(&self, axis: &str) -> Result<usize> {
        let i = self.shape.index(axis)?;
        Ok(self.shape.coords(self.world.rank())[i])
    }

    /// This rank's group spanning several axes (for example `["ring", "ulysses"]`, or
    /// `["dp", "sp"]` for ZeRO). Collective: every rank must call it, in the same order.
    pub fn subgroup(&self, axes: &[&str]) -> Result<Group> {
        let (colour, key) = self.shape.colour_key(axes, self.world.rank())?;
        let group = self.world.split(&axes.join("+"), Some(colour), key)?;
        group.ok_or_else(|| Error::InvalidArgument {
            op: "mesh",
            group: self.world.info().to_string(),
            msg: format!("rank {} found no group for {axes:?}", self.world.rank()),
        })
    }
}
