"""Jobs that orchestrate estimators, solvers and the backend: ``run`` / ``demo``
(:mod:`.pipeline`), operating-point refinement (:mod:`.refine`) and the Bayesian search
(:mod:`.search`). The CLI and the service call these; nothing below imports them.
"""
