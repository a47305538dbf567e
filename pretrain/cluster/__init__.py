"""Running the trainer on a cluster: the job a scheduler needs (rendered from the templates in slurm/
and k8s/), checked before it is sent, and what the scheduler says about it afterwards.

``pretrain.submit`` is the command line; ``job`` holds what both schedulers share, ``slurm`` and
``k8s`` one scheduler each.
"""
