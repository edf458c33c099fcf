"""The teacher's trajectories for CMT (docs/spec/cm.md §2): solved live, with the whole N-step multistep
DPM-Solver++ solve captured in a CUDA graph and replayed (solver.py `TeacherSolver`), or read back from a
resumable store of pre-generated trajectories (trajectory_cache.py, `python -m engine.teacher.trajectory_cache`),
which records its teacher's and data's fingerprints and checks them, its labels and its disk space before writing
(store_checks.py)."""
