"""``diffcore plan``: a job's peak device memory, predicted from its model on the meta device
(:mod:`~diffcore.plan.inventory`, :mod:`~diffcore.plan.live`), the memory and step-time model of each
setting (:mod:`~diffcore.plan.costs`), the choice (:mod:`~diffcore.plan.search`), its table and the job
file it writes; :mod:`~diffcore.plan.measure` trains a job for real to check the prediction."""
