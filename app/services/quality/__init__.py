"""Quality control and evidence: annotator agreement, gold tasks, annotator stats, the policy leaderboard.

Modules:
- agreement: pairwise agreement and Krippendorff's alpha (ordinal) on tasks with overlap >= 2;
- gold: gold accuracy, flagged annotators, the usable-comparisons filter, rounds' annotation records;
- annotator_stats: throughput, time per task, skip/flag rates, suspicious patterns;
- leaderboard: Bradley-Terry ratings of policy versions from arena battles, on the Elo scale.

Everything here reads the tables and returns plain dataclasses; the admin pages and the
exports render them. Only numpy is used for the statistics.
"""
