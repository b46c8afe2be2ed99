"""Connectors between the vision tower and the LLM, picked by `connector:` in the model config."""

from mmtrain.model.connectors.base import CONNECTORS, Connector, connector_class, register_connector
# importing each connector registers it (by name, not module: exported copies of these files are flat)
from mmtrain.model.connectors.abstractor import AbstractorConnector  # noqa: F401
from mmtrain.model.connectors.layerwise import LayerwiseConnector  # noqa: F401
from mmtrain.model.connectors.mlp import MLPConnector  # noqa: F401
from mmtrain.model.connectors.xattn import XAttnConnector  # noqa: F401

__all__ = ["CONNECTORS", "Connector", "build_connector", "connector_class", "register_connector"]


def build_connector(config) -> Connector:
    """The connector named by `config.connector`, built from `config.connector_config`."""
    return connector_class(config.connector)(config)
