"""diffcore-distill: few-step models by distillation (methods ``lcm``, ``consistency``, ``reflow``)."""
