"""`aded bench`: every method side by side on the user's model and machine, as Spec-Bench reports.

Rooms: `questions` (question files), `runner` (the methods and the fair timing loop), `report`
(results.json summary, report.md, plots, comparison), `simulate` (replaying recorded outputs through
drafters without the model), `cli` (the typer surface). Heavy libraries load only when a run starts.
"""
