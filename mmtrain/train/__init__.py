"""mmtrain.train"""
