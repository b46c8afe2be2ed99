"""mmtrain.model.connectors"""
