"""mmtrain: DeepSpeed-native training of vision-language LLMs that understand products."""

__version__ = "0.1.0"
