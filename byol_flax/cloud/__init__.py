"""Cloud runs: TPU slices (devices, hosts, batch plans; ``slices``), the task definitions of
engines that recover preempted jobs (SkyPilot managed jobs, xpk workloads; ``tasks``) and the
command that prints them (``launch``, ``byol-launch``)."""
