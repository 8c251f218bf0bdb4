"""One module per `jaxsd bench` suite. Each has `add_arguments(parser)`, `run(args) -> list[record]`
and `format_table(records) -> str`, plus the `child_<role>(config)` functions its child processes run."""
