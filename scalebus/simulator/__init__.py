"""The policy simulator: a simulated queue and fleet behind the controller's ports, driven by the controller's
own step, beside models of the autoscalers users compare it with."""
