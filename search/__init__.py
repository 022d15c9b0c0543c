"""Strategy search: requirements, the candidate space, and the plan (recommendation, Pareto front, binding
requirements, and the nearest feasible relaxation when nothing fits)."""
