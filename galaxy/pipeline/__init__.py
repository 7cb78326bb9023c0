"""Pipeline parallelism: schedules as action lists, point-to-point links, the training step."""
from galaxy.pipeline.engine import PipelineForwardBackward, TiedCopies, split_batch
from galaxy.pipeline.p2p import StageLinks
from galaxy.pipeline.schedule import (Action, ScheduleStats, format_actions, gpipe_actions, interleaved_actions,
                                      one_f_one_b_actions, run_schedule, schedule_actions, simulate, zb_h1_actions)

__all__ = ["PipelineForwardBackward", "TiedCopies", "split_batch", "StageLinks", "Action", "ScheduleStats",
           "format_actions", "gpipe_actions", "interleaved_actions", "one_f_one_b_actions", "run_schedule",
           "schedule_actions", "simulate", "zb_h1_actions"]
