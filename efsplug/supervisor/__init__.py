"""The supervisor: keeps every efs mount's tunnel alive, its certificate fresh, and reaps what is gone."""
