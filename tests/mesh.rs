//! The mesh: one rank grid, every subgroup a slice of it, checked for every rank and axis
//! against the layout in its documentation, and used for real communication.

use anyhow::{ensure, Result};
use tch::Tensor;
use ulysses::comm::{launch, MeshShape, ReduceOp};

#[test]
fn dp_sp_groups_are_contiguous_sp_blocks() -> Result<()> {
    for (dp, sp) in [(1, 4), (2, 2), (2, 4), (4, 2), (3, 1)] {
        let shape = MeshShape::dp_sp(dp, sp)?;
        for r in 0..dp * sp {
            let sp_group: Vec<usize> = (r / sp * sp..r / sp * sp + sp).collect();
            let dp_group: Vec<usize> = (0..dp).map(|k| r % sp + k * sp).collect();
            ensure!(shape.group_ranks(&["sp"], r)? == sp_group, "dp={dp} sp={sp} rank {r}: sp group");
            ensure!(shape.group_ranks(&["dp"], r)? == dp_group, "dp={dp} sp={sp} rank {r}: dp group");
            ensure!(shape.coords(r) == vec![r / sp, r % sp], "rank {r}: coords");
            let all: Vec<usize> = (0..dp * sp).collect();
            ensure!(shape.group_ranks(&["dp", "sp"], r)? == all, "rank {r}: dp+sp");
        }
    }
    Ok(())
}

#[test]
fn mesh_groups_match_the_grid_on_every_rank_and_axis() -> Result<()> {
    let shapes = [
        MeshShape::dp_sp(2, 4)?,
        MeshShape::new(&[("dp", 2), ("sp", 2), ("tp", 2)])?,
        MeshShape::new(&[("dp", 1), ("ring", 2), ("ulysses", 3)])?,
    ];
    for shape in shapes {
        let n = shape.world_size();
        let axes: Vec<String> = shape.axes().map(|(a, _)| a.to_string()).collect();
        launch(n, |ctx| -> Result<()> {
            let r = ctx.rank();
            let mesh = ctx.mesh(shape.clone())?;
            for (i, axis) in axes.iter().enumerate() {
                let g = mesh.group(axis)?;
                let want = shape.group_ranks(&[axis], r)?;
                ensure!(
                    g.info().ranks == want,
                    "{shape:?} rank {r} axis {axis}: {:?} vs {want:?}",
                    g.info().ranks
                );
                ensure!(
                    g.rank() == shape.coords(r)[i] && mesh.coord(axis)? == g.rank(),
                    "rank {r} axis {axis}: index"
                );
                // The group really is those ranks: the sum of their global ranks.
                let sum = g.all_reduce(&Tensor::from_slice(&[r as i64]), ReduceOp::Sum)?;
                ensure!(
                    sum.int64_value(&[0]) == want.iter().sum::<usize>() as i64,
                    "rank {r} axis {axis}: sum"
                );
            }
            // A group over two axes (the last two: SP in a USP layout, or sp+tp).
            let two: Vec<&str> = axes[1..].iter().map(String::as_str).collect();
            let g = mesh.subgroup(&two)?;
            ensure!(g.info().ranks == shape.group_ranks(&two, r)?, "rank {r}: {two:?}");
            ensure!(g.info().name == two.join("+"), "name {}", g.info().name);
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn ulysses_groups_are_contiguous_inside_rings() -> Result<()> {
    let shape = MeshShape::new(&[("ring", 2), ("ulysses", 4)])?;
    ensure!(shape.group_ranks(&["ulysses"], 5)? == vec![4, 5, 6, 7], "ulysses group of 5");
    ensure!(shape.group_ranks(&["ring"], 5)? == vec![1, 5], "ring group of 5");
    ensure!(shape.size("ulysses")? == 4 && shape.size("nope").is_err(), "sizes");
    Ok(())
}
