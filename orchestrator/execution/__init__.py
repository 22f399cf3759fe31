"""Running a plan on Ray: the Ray connection and pre-flight, the Tune phase runner, the
pretraining, transfer, search and datamodel phases, the study driver, and Ray jobs.

Each trial hands a trainer its frozen config dataclass, as the plan built it.
"""
