"""run_parallel.py: the command line (cli), the checks made before any weight is read (checks), the world
loaded once that makes every video (world.run_job), jobs, output names, the prompts-file batch and the
job service (service/)."""
