"""YAML configs and the typed loader that validates them."""

from configs.loader import (ConfigError, config_from_dict, config_to_dict, flatten_config,
                            load_config, load_site_config)
from configs.schema import (AutoencoderConfig, AutoencoderTrainingConfig, Config,
                            ConditioningConfig, DataConfig, DiffusionConfig, DPGateConfig,
                            FederationConfig, ModelConfig, PretrainConfig, PrivacyConfig,
                            ReleaseConfig, SiteBudgetConfig, SiteConfig, ThresholdConfig,
                            TrackingConfig, UNetConfig, UNetTrainingConfig)

__all__ = [
    "AutoencoderConfig", "AutoencoderTrainingConfig", "Config", "ConditioningConfig",
    "ConfigError", "DataConfig", "DiffusionConfig", "DPGateConfig", "FederationConfig",
    "ModelConfig", "PretrainConfig", "PrivacyConfig", "ReleaseConfig", "SiteBudgetConfig",
    "SiteConfig", "ThresholdConfig", "TrackingConfig", "UNetConfig", "UNetTrainingConfig",
    "config_from_dict", "config_to_dict", "flatten_config", "load_config", "load_site_config",
]
