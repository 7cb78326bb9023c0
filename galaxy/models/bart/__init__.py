from galaxy.models.bart.model import BartConfig, BartForConditionalGeneration, BartModel

__all__ = ["BartConfig", "BartModel", "BartForConditionalGeneration"]
