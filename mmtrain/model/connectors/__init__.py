"""Connectors between the vision tower and the LLM, picked by `connector:` in the model config."""

from mmtrain.model.connectors.base import CONNECTORS, Connector, connector_class, register_connector
from mmtrain.model.connectors import abstractor, layerwise, mlp, xattn  # noqa: F401  (registers them)

__all__ = ["CONNECTORS", "Connector", "build_connector", "connector_class", "register_connector"]


def build_connector(config) -> Connector:
    """The connector named by `config.connector`, built from `config.connector_config`."""
    return connector_class(config.connector)(config)
