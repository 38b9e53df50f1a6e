"""What every command needs around the science: the console and log file (``console``), XLA
flags and the guarded tracing patch (``xla``), name -> constructor registries (``registry``)."""
