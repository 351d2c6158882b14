//! Which part of a comparison this process runs: `K/N` given, or read from the scheduler's
//! environment (Slurm job arrays, Kubernetes Indexed Jobs, `RANK`/`WORLD_SIZE`).

use crate::error::{Error, Result};

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// `K/N`, K in 0..N.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::arg(
                "shard",
                format!("{s:?}: a shard is K/N with 0 <= K < N (e.g. 0/4)"),
            )
        };
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// Whether unit `i` (of a deterministic list) is this shard's.
    pub fn has(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// The shard the environment `var` gives (a scheduler's variables), if any:
    /// - Slurm job arrays: `SLURM_ARRAY_TASK_ID` among `SLURM_ARRAY_TASK_COUNT` tasks, indices
    ///   counted from `SLURM_ARRAY_TASK_MIN` (they need not start at 0; `--array=1-8` gives
    ///   shards 0..8);
    /// - Kubernetes Indexed Jobs: `JOB_COMPLETION_INDEX`, with the count given (`count`,
    ///   `--shard-count`: the Job's `completions`);
    /// - `RANK` of `WORLD_SIZE` (torchrun and MPI-style launchers).
    ///
    /// A variable that is set but unusable is an error naming it.
    pub fn from_env(
        var: &dyn Fn(&str) -> Option<String>,
        count: Option<usize>,
    ) -> Result<Option<Self>> {
        let num = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::arg("shard", format!("{name}={v:?} is not a whole number"))
                }),
            }
        };
        let make = |index: usize, count: usize, from: &str| -> Result<Option<Self>> {
            if count == 0 || index >= count {
                return Err(Error::arg(
                    "shard",
                    format!("{from}: shard {index} of {count} (K must be below N)"),
                ));
            }
            Ok(Some(Self { index, count }))
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let total = num("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                Error::arg(
                    "shard",
                    "SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT",
                )
            })?;
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or_else(|| {
                Error::arg(
                    "shard",
                    format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"),
                )
            })?;
            return make(index, total, "the Slurm array task");
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = count.ok_or_else(|| {
                Error::arg(
                    "shard",
                    "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): give the Job's \
                     completions as --shard-count N",
                )
            })?;
            return make(index, count, "JOB_COMPLETION_INDEX");
        }
        if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            return make(rank, world, "RANK / WORLD_SIZE");
        }
        Ok(None)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn k_of_n_parses_and_refuses_what_is_not_a_shard() {
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1/0", "a/2", "3", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        let s = Shard::parse("1/3").unwrap();
        let mine: Vec<usize> = (0..8).filter(|&i| s.has(i)).collect();
        assert_eq!(mine, [1, 4, 7]);
    }

    #[test]
    fn schedulers_environments_pick_their_shard() {
        // `sbatch --array=1-8`: indices from 1, MIN 1.
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]);
        assert_eq!(
            Shard::from_env(&slurm, None).unwrap(),
            Some(Shard { index: 2, count: 8 })
        );
        // From 0, MIN unset.
        let slurm0 = env(&[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            Shard::from_env(&slurm0, None).unwrap(),
            Some(Shard { index: 0, count: 4 })
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "5")]);
        assert_eq!(
            Shard::from_env(&k8s, Some(6)).unwrap(),
            Some(Shard { index: 5, count: 6 })
        );
        let e = Shard::from_env(&k8s, None).unwrap_err().to_string();
        assert!(e.contains("--shard-count"), "{e}");
        assert!(Shard::from_env(&k8s, Some(5)).is_err());
        let torch = env(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
        assert_eq!(
            Shard::from_env(&torch, None).unwrap(),
            Some(Shard { index: 1, count: 2 })
        );
        assert_eq!(Shard::from_env(&env(&[]), None).unwrap(), None);
        let e = Shard::from_env(&env(&[("SLURM_ARRAY_TASK_ID", "x")]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_ID"), "{e}");
    }
}
