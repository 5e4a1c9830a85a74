"""Tasks over one runner: the task protocol and `Evaluators` (`base`), the runner (`runner`), and one module per task:
`librilight`, `likelihood`, `dialogue`."""
