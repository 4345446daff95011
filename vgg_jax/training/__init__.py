"""Training (section 3.1 of the paper): ``steps`` (the jitted train and validation steps),
``loop`` (``train(config, workdir)``: resume, validate, plateau rule, checkpoints, SIGTERM),
``optim`` (momentum SGD with L2, the plateau rule), ``init_from`` (net-A and scale fine-tune
initialisation)."""
