"""A run: built from the config (`build`), driven round by round (`loop`), observed by callbacks
(`evaluation`, `sinks`, `callbacks`), summarised at the end (`summary`)."""
