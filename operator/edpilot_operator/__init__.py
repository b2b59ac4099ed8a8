"""edpilot's Kubernetes side: the kopf operator and the scheduler extender."""
