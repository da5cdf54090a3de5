"""The report: our figures beside the reference study's. ``finding`` looks up each experiment's
runs, ``reading`` reads what they hold, ``sections`` writes one section per kind of experiment,
``build`` assembles report.md and logs it."""
