"""mmtrain.model"""
